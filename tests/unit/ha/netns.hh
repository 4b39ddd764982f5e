#pragma once
// Test scaffolding for the kernel HA backend: runs a scenario in a forked child inside fresh
// network namespaces (only lo, nothing shared with the host), so tests can create veths,
// macvlans and addresses (198.18.0.0/15 only) and leave nothing behind: the namespaces die
// with the child. Needs root; skips with a message when not root or when unshare fails.
//
// The child reports through GoogleTest itself: assertion failures print from the child and
// its exit code tells the parent whether any happened.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>

namespace tern::ha::testing {

inline constexpr int exit_skip_unshare = 77;
inline constexpr int exit_skip_ip = 78;

// Runs body in a forked child in a new network namespace (lo up). Call from a TEST body.
inline void run_in_netns(const std::function<void()>& body) {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root (network namespaces, raw sockets)";
    std::fflush(nullptr);
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
        if (::unshare(CLONE_NEWNET) != 0) ::_exit(exit_skip_unshare);
        if (std::system("ip link set lo up") != 0) ::_exit(exit_skip_ip);
        body();
        std::fflush(nullptr);
        ::_exit(::testing::Test::HasFailure() ? 1 : 0);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status)) << "child died with signal " << WTERMSIG(status);
    if (WEXITSTATUS(status) == exit_skip_unshare)
        GTEST_SKIP() << "unshare(CLONE_NEWNET) failed: network namespaces unavailable";
    if (WEXITSTATUS(status) == exit_skip_ip)
        GTEST_SKIP() << "iproute2 `ip` not usable (needed to build the test network)";
    EXPECT_EQ(WEXITSTATUS(status), 0) << "the scenario failed in the child; see above";
}

// Runs a shell command in the current namespace; a failure is a test failure.
inline bool sh(const std::string& cmd) {
    int rc = std::system(cmd.c_str());
    EXPECT_EQ(rc, 0) << "command failed: " << cmd;
    return rc == 0;
}

// Runs a command and returns its stdout.
inline std::string sh_out(const std::string& cmd) {
    std::string out;
    FILE* f = ::popen(cmd.c_str(), "r");
    if (!f) return out;
    char buf[512];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
    ::pclose(f);
    return out;
}

inline std::string read_file(const std::string& path) {
    std::string out;
    FILE* f = std::fopen(path.c_str(), "r");
    if (!f) return "<cannot open " + path + ">";
    char buf[256];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
    std::fclose(f);
    while (!out.empty() && out.back() == '\n') out.pop_back();
    return out;
}

// Two namespaces joined by a veth pair: "va" in A (198.18.0.1/24, MAC 02:00:00:00:00:0a),
// "vb" in B (198.18.0.2/24, MAC 02:00:00:00:00:0b), both up. Built from inside the child of
// run_in_netns (whose namespace becomes A). Sockets keep the namespace they were opened
// in, so a test opens B's sockets after enter_b() and A's after enter_a().
class two_hosts {
public:
    bool build() {
        a_fd_ = ::open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
        if (a_fd_ < 0 || ::unshare(CLONE_NEWNET) != 0) return false;
        // Not CLOEXEC: `ip` must open it through /proc/<pid>/fd to move the peer there.
        b_fd_ = ::open("/proc/self/ns/net", O_RDONLY);
        if (b_fd_ < 0) return false;
        if (!sh("ip link set lo up")) return false;
        enter_a();
        std::string b_path = "/proc/" + std::to_string(::getpid()) + "/fd/" + std::to_string(b_fd_);
        if (!sh("ip link add va address 02:00:00:00:00:0a type veth peer name vb "
                "address 02:00:00:00:00:0b netns " + b_path) ||
            !sh("ip addr add 198.18.0.1/24 dev va && ip link set va up"))
            return false;
        enter_b();
        if (!sh("ip addr add 198.18.0.2/24 dev vb && ip link set vb up")) return false;
        enter_a();
        return true;
    }
    void enter_a() { EXPECT_EQ(::setns(a_fd_, CLONE_NEWNET), 0); }
    void enter_b() { EXPECT_EQ(::setns(b_fd_, CLONE_NEWNET), 0); }
    ~two_hosts() {
        if (a_fd_ >= 0) ::close(a_fd_);
        if (b_fd_ >= 0) ::close(b_fd_);
    }

private:
    int a_fd_ = -1;
    int b_fd_ = -1;
};

}  // namespace tern::ha::testing
