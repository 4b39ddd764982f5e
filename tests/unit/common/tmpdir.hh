#pragma once
// A temporary directory removed at the end of the test.
#include <stdlib.h>

#include <filesystem>
#include <string>

struct tmpdir {
  std::string path;
  tmpdir() {
    char t[] = "/tmp/tern-test-XXXXXX";
    path = mkdtemp(t);
  }
  ~tmpdir() { std::filesystem::remove_all(path); }
};
