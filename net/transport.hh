#pragma once
// The transport seam between a socket and a protocol session.
//
// The reactor moves bytes between the socket and the connection's buffers; the session
// (sans-I/O) only ever sees application bytes. In between sits a transport: the plain one
// passes bytes through untouched (and without a copy on the send side), a TLS transport
// (tls/, next issues) decrypts what arrives and encrypts what leaves, with wolfSSL driven
// through memory I/O callbacks, so that the ring still does all socket I/O. STARTTLS then
// replaces a connection's transport between two commands without the session or the loop
// knowing.
//
// Trust: a transport sees raw, untrusted bytes. It must bound what it buffers; a protocol
// error (a TLS alert, a bad record) is returned as an error, never an exception.
#include <cstddef>
#include <string>
#include <string_view>

namespace tern::net {

// Where decoded application bytes go (the session's input).
class byte_sink {
 public:
  virtual ~byte_sink() = default;
  virtual void put(const char* p, size_t n) = 0;
};

enum class transport_status : uint8_t {
  ok,
  closed,  // the peer ended the transport cleanly (TLS close_notify)
  error,   // fatal: close the connection
};

class transport {
 public:
  virtual ~transport() = default;
  // Bytes read from the socket. Application bytes go to `app`; bytes the transport itself
  // must send (handshake, alerts) are appended to `wire_out`.
  virtual transport_status on_recv(const char* p, size_t n, byte_sink& app, std::string& wire_out) = 0;
  // Application bytes to send: `app_out` is consumed (left empty) and its wire form is
  // appended to `wire_out`. The plain transport swaps the buffers when wire_out is empty.
  virtual transport_status on_send(std::string& app_out, std::string& wire_out) = 0;
  // Bytes held inside the transport that the peer has not seen yet (TLS records being
  // built); counted by the owner's output back-pressure.
  virtual size_t buffered() const noexcept { return 0; }
  virtual bool secure() const noexcept { return false; }
  virtual std::string_view name() const noexcept = 0;
};

// Bytes pass through. Stateless: one instance serves every plain connection of a thread.
class plain_transport final : public transport {
 public:
  transport_status on_recv(const char* p, size_t n, byte_sink& app, std::string&) override {
    app.put(p, n);
    return transport_status::ok;
  }
  transport_status on_send(std::string& app_out, std::string& wire_out) override {
    if (wire_out.empty()) {
      wire_out.swap(app_out);
    } else {
      wire_out.append(app_out);
    }
    app_out.clear();
    return transport_status::ok;
  }
  std::string_view name() const noexcept override { return "plain"; }
  static plain_transport& instance() noexcept {
    static thread_local plain_transport t;
    return t;
  }
};

}  // namespace tern::net
