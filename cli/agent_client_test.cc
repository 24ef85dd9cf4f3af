// The agent client against a scripted agent on a socketpair: streaming, exit codes, ERROR
// frames, and a hostile agent's malformed frames rejected as AgentError.
#include "cli/agent_client.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <functional>
#include <thread>

#include <gtest/gtest.h>

#include "agent_protocol.h"

namespace clonevm::cli {
namespace {

struct Pipe {
  int read = -1, write = -1;
  Pipe() {
    int fds[2];
    EXPECT_EQ(::pipe2(fds, O_CLOEXEC), 0);
    read = fds[0];
    write = fds[1];
  }
  ~Pipe() {
    if (read >= 0) ::close(read);
    if (write >= 0) ::close(write);
  }
  void closeWrite() {
    ::close(write);
    write = -1;
  }
  std::string drain() {
    closeWrite();
    std::string out;
    char buffer[4096];
    ssize_t n;
    while ((n = ::read(read, buffer, sizeof buffer)) > 0) out.append(buffer, static_cast<size_t>(n));
    return out;
  }
};

// Runs `agent` on the far end of a socketpair; the client gets the near end.
class ScriptedAgent {
 public:
  explicit ScriptedAgent(std::function<void(AgentConnection&)> agent) {
    int fds[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
    client_.emplace(UniqueFd(fds[0]));
    thread_ = std::thread([fd = fds[1], agent = std::move(agent)] {
      AgentConnection far{UniqueFd(fd)};
      try {
        agent(far);
      } catch (const std::exception&) {
      }
    });
  }
  ~ScriptedAgent() {
    client_.reset();
    thread_.join();
  }
  AgentConnection& client() { return *client_; }

 private:
  std::optional<AgentConnection> client_;
  std::thread thread_;
};

std::span<const uint8_t> bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

void sendExit(AgentConnection& c, uint32_t kind, int32_t value) {
  uint8_t raw[CA_EXIT_SIZE];
  ca_exit e{kind, value};
  ca_encode_exit(raw, &e);
  c.sendFrame(CA_EXIT, raw);
}

TEST(AgentClient, ExecStreamsBothWaysAndReturnsTheExitCode) {
  std::string seenStdin;
  std::vector<std::string> seenArgv;
  ScriptedAgent agent([&](AgentConnection& c) {
    auto request = c.readFrame();
    ASSERT_TRUE(request && request->type == CA_EXEC);
    ca_exec exec;
    ASSERT_EQ(ca_decode_exec(request->payload.data(), request->payload.size(), &exec), CA_OK);
    for (uint32_t i = 0; i < exec.argc; ++i) seenArgv.push_back(exec.argv[i]);
    std::free(exec.argv);
    for (;;) {
      auto frame = c.readFrame();
      ASSERT_TRUE(frame);
      if (frame->type == CA_STDIN_EOF) break;
      ASSERT_EQ(frame->type, CA_STDIN);
      seenStdin.append(frame->payload.begin(), frame->payload.end());
    }
    c.sendFrame(CA_STDOUT, bytes("out:" + seenStdin));
    c.sendFrame(CA_STDERR, bytes("err"));
    sendExit(c, 0, 7);
  });
  Pipe in, out, err;
  ASSERT_EQ(::write(in.write, "hello", 5), 5);
  in.closeWrite();
  auto result = exec(agent.client(), {{"cat", "-"}, std::nullopt}, in.read, out.write, err.write);
  EXPECT_FALSE(result.signaled);
  EXPECT_EQ(result.exitCode(), 7);
  EXPECT_EQ(out.drain(), "out:hello");
  EXPECT_EQ(err.drain(), "err");
  EXPECT_EQ(seenArgv, (std::vector<std::string>{"cat", "-"}));
}

TEST(AgentClient, SignalsMapTo128PlusSignal) {
  ScriptedAgent agent([](AgentConnection& c) {
    c.readFrame();
    sendExit(c, 1, 9);
  });
  Pipe out, err;
  auto result = exec(agent.client(), {{"sleep", "100"}, std::nullopt}, -1, out.write, err.write);
  EXPECT_TRUE(result.signaled);
  EXPECT_EQ(result.exitCode(), 137);
}

TEST(AgentClient, ErrorFrameCarriesTheGuestErrno) {
  ScriptedAgent agent([](AgentConnection& c) {
    c.readFrame();
    uint8_t payload[4 + CA_MAX_ERROR_TEXT];
    long n = ca_encode_error(payload, sizeof payload, ENOENT, "exec nope: No such file or directory");
    c.sendFrame(CA_ERROR, std::span(payload, static_cast<size_t>(n)));
  });
  Pipe out, err;
  try {
    exec(agent.client(), {{"nope"}, std::nullopt}, -1, out.write, err.write);
    FAIL() << "no error";
  } catch (const AgentError& error) {
    EXPECT_EQ(error.errorCode(), ENOENT);
    EXPECT_NE(std::string(error.what()).find("exec nope"), std::string::npos);
  }
}

// A hostile or broken agent: raw bytes on the wire.
void expectRejected(const std::vector<uint8_t>& wire, const std::string& why) {
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  AgentConnection client{UniqueFd(fds[0])};
  std::thread agent([fd = fds[1], wire] {
    (void)!::write(fd, wire.data(), wire.size());
    // Half-close, and read what the client sends until it hangs up: closing with unread
    // data would make the client see ECONNRESET instead of our bytes.
    ::shutdown(fd, SHUT_WR);
    uint8_t drain[4096];
    while (::read(fd, drain, sizeof drain) > 0) {
    }
    ::close(fd);
  });
  Pipe out, err;
  EXPECT_THROW(exec(client, {{"true"}, std::nullopt}, -1, out.write, err.write), AgentError) << why;
  ::shutdown(client.fd(), SHUT_RDWR);
  agent.join();
}

std::vector<uint8_t> frame(uint16_t version, uint16_t type, uint32_t length,
                           std::vector<uint8_t> payload = {}) {
  std::vector<uint8_t> out = {static_cast<uint8_t>(version), static_cast<uint8_t>(version >> 8),
                              static_cast<uint8_t>(type), static_cast<uint8_t>(type >> 8),
                              static_cast<uint8_t>(length), static_cast<uint8_t>(length >> 8),
                              static_cast<uint8_t>(length >> 16), static_cast<uint8_t>(length >> 24)};
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

TEST(AgentClient, MalformedFramesFromTheAgentAreRejected) {
  expectRejected(frame(2, CA_EXIT, 8, std::vector<uint8_t>(8)), "version 2");
  expectRejected(frame(1, 200, 0), "unknown type");
  expectRejected(frame(1, CA_STDOUT, 0xffffffffu), "4 GiB frame");
  expectRejected(frame(1, CA_STDOUT, 100, std::vector<uint8_t>(10)), "truncated payload");
  expectRejected(frame(1, CA_EXIT, 4, std::vector<uint8_t>(4)), "short EXIT");
  expectRejected(frame(1, CA_EXIT, 8, {0, 0, 0, 0, 0, 1, 0, 0}), "exit code 256");
  expectRejected(frame(1, CA_IDENTITY_RESULT, 0), "answer of the wrong type");
  expectRejected({1, 0, 6}, "cut header");
  expectRejected({}, "hang-up before EXIT");
}

TEST(AgentClient, TimeoutEndsTheWait) {
  ScriptedAgent agent([](AgentConnection& c) {
    c.readFrame();
    c.readFrame();  // STDIN_EOF; then silence until the client hangs up
    c.readFrame();
  });
  Pipe out, err;
  auto start = std::chrono::steady_clock::now();
  EXPECT_THROW(exec(agent.client(), {{"sleep", "100"}, std::nullopt}, -1, out.write, err.write,
                    std::chrono::milliseconds(200)),
               Error);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

TEST(AgentClient, IdentityRoundTrip) {
  ca_identity seen{};
  ScriptedAgent agent([&](AgentConnection& c) {
    auto request = c.readFrame();
    ASSERT_TRUE(request && request->type == CA_IDENTITY);
    ASSERT_EQ(ca_decode_identity(request->payload.data(), request->payload.size(), &seen), CA_OK);
    ca_identity_result res{};
    res.applied = seen.fields;
    res.reseed_error = ENOTTY;
    res.entropy_avail = 256;
    res.crng_ready = 1;
    res.clock_seconds = seen.clock_seconds;
    std::memcpy(res.hostname, seen.hostname, seen.hostname_length);
    res.hostname_length = seen.hostname_length;
    uint8_t out[CA_IDENTITY_RESULT_MAX_SIZE];
    long n = ca_encode_identity_result(out, sizeof out, &res);
    c.sendFrame(CA_IDENTITY_RESULT, std::span(out, static_cast<size_t>(n)));
  });
  Identity identity;
  identity.hostname = "fork-1";
  identity.rngSeed = std::vector<uint8_t>(32, 0xab);
  identity.clock = std::chrono::system_clock::time_point(std::chrono::seconds(1800000000));
  auto result = applyIdentity(agent.client(), identity);
  EXPECT_TRUE(result.hostnameApplied && result.seedApplied && result.clockApplied);
  EXPECT_EQ(result.guestHostname, "fork-1");
  EXPECT_EQ(result.reseedError, ENOTTY);
  EXPECT_EQ(result.entropyAvail, 256);
  EXPECT_EQ(std::chrono::duration_cast<std::chrono::seconds>(result.guestClock.time_since_epoch()).count(),
            1800000000);
  EXPECT_EQ(seen.seed_length, 32u);
  // Bad input is refused on the host before anything is sent.
  Identity bad;
  bad.hostname = std::string(65, 'a');
  ScriptedAgent idle([](AgentConnection& c) { c.readFrame(); });
  EXPECT_THROW(applyIdentity(idle.client(), bad), Error);
}

}  // namespace
}  // namespace clonevm::cli
