// The fork server's process handling, without KVM: a "fork" here writes its id to its output
// and ends once its API listener gets a connection. (The VM a real fork restores is tested in
// the lab: tests/e2e/fork_test.cc.)
#include "vmm-core/api/fork_server.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>
#include <spdlog/sinks/null_sink.h>

namespace clonevm::vmm {
namespace {

using namespace std::chrono_literals;

struct Listener {
  UniqueFd fd;
  sockaddr_un address{};
  socklen_t length = 0;
};
Listener listener() {
  Listener l;
  l.fd = UniqueFd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  l.address.sun_family = AF_UNIX;
  EXPECT_EQ(::bind(l.fd.get(), reinterpret_cast<sockaddr*>(&l.address), sizeof(sa_family_t)), 0);
  EXPECT_EQ(::listen(l.fd.get(), 1), 0);
  l.length = sizeof(l.address);
  EXPECT_EQ(::getsockname(l.fd.get(), reinterpret_cast<sockaddr*>(&l.address), &l.length), 0);
  return l;
}

void connectTo(const Listener& l) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_EQ(::connect(fd.get(), reinterpret_cast<const sockaddr*>(&l.address), l.length), 0);
}

std::string readAll(int fd) {
  std::string text;
  char buffer[256];
  ssize_t n;
  while ((n = ::read(fd, buffer, sizeof(buffer))) > 0) text.append(buffer, static_cast<size_t>(n));
  return text;
}

// Waits for `pid` up to `limit`; returns its status, or -1 if it is still running.
int waitFor(pid_t pid, std::chrono::milliseconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  int status = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    if (::waitpid(pid, &status, WNOHANG) == pid) return status;
    std::this_thread::sleep_for(5ms);
  }
  return -1;
}

// A spare announces kFirstCid + its pid as the CID it took.
constexpr uint32_t kFirstCid = 3;

// Starts a server process on `serverEnd`; its forks write their id and wait for a connection.
pid_t startServer(UniqueFd& clientEnd, UniqueFd& serverEnd, ForkServerLimits limits = {}) {
  pid_t pid = ::fork();
  if (pid == 0) {
    clientEnd.reset();
    spdlog::logger log("t", std::make_shared<spdlog::sinks::null_sink_st>());
    auto spare = serveForks(serverEnd.get(), limits, log);
    if (!spare) ::_exit(0);
    spare->announce(kFirstCid + static_cast<uint32_t>(::getpid()));
    auto request = spare->takeRequest();
    if (!request) ::_exit(9);  // the server ended before it needed this spare
    std::string text = "fork " + request->forkId + " pid " + std::to_string(::getpid());
    (void)!::write(request->output.get(), text.data(), text.size());
    request->output.reset();
    UniqueFd connection(::accept(request->apiListener.get(), nullptr, nullptr));
    ::_exit(connection ? 7 : 8);
  }
  serverEnd.reset();
  return pid;
}

struct Output {
  UniqueFd read, write;
};
Output makeOutput() {
  int ends[2];
  EXPECT_EQ(::pipe2(ends, O_CLOEXEC), 0);
  return {UniqueFd(ends[0]), UniqueFd(ends[1])};
}

TEST(ForkServerTest, OneForkPerRequestEachWithItsOwnFdsAndTheServerEndsAfterThem) {
  auto [client, server] = ipc::makeForkSocketPair();
  pid_t serverPid = startServer(client, server);
  std::vector<Listener> apis;
  std::vector<Output> outputs;
  std::vector<pid_t> pids;
  for (int i = 0; i < 2; ++i) {
    apis.push_back(listener());
    outputs.push_back(makeOutput());
    ipc::ForkRequest request;
    request.forkId = "fork-" + std::to_string(i);
    request.apiSocketName = "api-" + std::to_string(i);
    request.apiListener = UniqueFd(::dup(apis.back().fd.get()));
    request.output = std::move(outputs.back().write);
    request.vsockCid = i == 1 ? 77 : 0;
    ipc::sendForkRequest(client.get(), request);
    auto reply = ipc::receiveForkReply(client.get());
    ASSERT_EQ(reply.error, "");
    ASSERT_GT(reply.pid, 0);
    pids.push_back(reply.pid);
    // The CID asked for, or else the one its spare took.
    EXPECT_EQ(reply.vsockCid, i == 1 ? 77 : kFirstCid + static_cast<uint32_t>(reply.pid));
  }
  EXPECT_NE(pids[0], pids[1]);
  // A broken request is answered with its reason; the server goes on.
  uint32_t junk[4] = {1, 2, 3, 4};
  ASSERT_EQ(::send(client.get(), junk, sizeof(junk), 0), static_cast<ssize_t>(sizeof(junk)));
  auto refused = ipc::receiveForkReply(client.get());
  EXPECT_EQ(refused.pid, 0);
  EXPECT_NE(refused.error.find("bytes, expected"), std::string::npos) << refused.error;

  // Each fork got its own output and API listener (the server's pid namespace is ours here).
  for (int i = 0; i < 2; ++i) {
    connectTo(apis[i]);
    EXPECT_EQ(readAll(outputs[i].read.get()),
              "fork fork-" + std::to_string(i) + " pid " + std::to_string(pids[i]));
  }
  // The client hangs up: the server ends once its forks have (they have, above).
  client.reset();
  int status = waitFor(serverPid, 10s);
  ASSERT_NE(status, -1) << "the fork server did not end";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

TEST(ForkServerTest, TheServerOutlivesTheClientWhileAForkRuns) {
  auto [client, server] = ipc::makeForkSocketPair();
  pid_t serverPid = startServer(client, server);
  Listener api = listener();
  Output output = makeOutput();
  ipc::ForkRequest request;
  request.forkId = "long-lived";
  request.apiListener = UniqueFd(::dup(api.fd.get()));
  request.output = std::move(output.write);
  ipc::sendForkRequest(client.get(), request);
  ASSERT_EQ(ipc::receiveForkReply(client.get()).error, "");
  client.reset();
  EXPECT_EQ(waitFor(serverPid, 300ms), -1) << "the server ended while its fork ran";
  connectTo(api);  // the fork ends
  int status = waitFor(serverPid, 10s);
  ASSERT_NE(status, -1) << "the fork server did not end after its fork";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

UniqueFd connectSeqpacket(const sockaddr_un& address, socklen_t length) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  EXPECT_EQ(::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), length), 0);
  return fd;
}

ipc::ForkReply askForFork(int client, const std::string& id, const Listener& api, Output& output) {
  ipc::ForkRequest request;
  request.forkId = id;
  request.apiListener = UniqueFd(::dup(api.fd.get()));
  request.output = std::move(output.write);
  ipc::sendForkRequest(client, request);
  return ipc::receiveForkReply(client);
}

// A listening server: clients come and go, forks are capped, and it lingers, then ends.
TEST(ForkServerTest, AListeningServerServesManyClientsCapsItsForksAndLingers) {
  UniqueFd requests(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  ASSERT_EQ(::bind(requests.get(), reinterpret_cast<sockaddr*>(&address), sizeof(sa_family_t)), 0);
  ASSERT_EQ(::listen(requests.get(), 8), 0);
  socklen_t length = sizeof(address);
  ASSERT_EQ(::getsockname(requests.get(), reinterpret_cast<sockaddr*>(&address), &length), 0);
  UniqueFd none;
  pid_t serverPid = startServer(none, requests, {std::chrono::milliseconds(400), 2, true});

  Listener apiA = listener(), apiB = listener(), apiC = listener();
  Output outA = makeOutput(), outB = makeOutput(), outC = makeOutput();
  {
    UniqueFd first = connectSeqpacket(address, length);
    EXPECT_EQ(askForFork(first.get(), "a", apiA, outA).error, "");
  }  // the first client hangs up; its fork runs on
  UniqueFd second = connectSeqpacket(address, length);
  EXPECT_EQ(askForFork(second.get(), "b", apiB, outB).error, "");
  auto third = askForFork(second.get(), "c", apiC, outC);
  EXPECT_NE(third.error.find("runs 2 forks, its most"), std::string::npos) << third.error;
  second.reset();
  EXPECT_EQ(waitFor(serverPid, 600ms), -1) << "the server ended while its forks ran";
  connectTo(apiA);
  connectTo(apiB);
  auto forksEnded = std::chrono::steady_clock::now();
  int status = waitFor(serverPid, 10s);
  ASSERT_NE(status, -1) << "the server did not end after lingering";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  EXPECT_GE(std::chrono::steady_clock::now() - forksEnded, 350ms) << "it did not linger";
}

// The children of `pid` (its main thread's), from /proc.
std::vector<pid_t> childrenOf(pid_t pid) {
  std::ifstream list(fmt::format("/proc/{}/task/{}/children", pid, pid));
  std::vector<pid_t> children;
  for (pid_t child; list >> child;) children.push_back(child);
  return children;
}

// The server prepares a spare before any request, hands it the next request, prepares the
// next spare, and ends its spare when it ends itself. Without keepSpare there is none.
TEST(ForkServerTest, AReadySpareBecomesTheNextForkAndEndsWithTheServer) {
  for (bool keepSpare : {true, false}) {
    SCOPED_TRACE(keepSpare ? "with a spare" : "without");
    auto [client, server] = ipc::makeForkSocketPair();
    pid_t serverPid = startServer(client, server, {std::chrono::milliseconds(0), 64, keepSpare});
    std::vector<pid_t> before;
    for (int i = 0; i < 400 && before.empty(); ++i) {
      std::this_thread::sleep_for(5ms);
      before = childrenOf(serverPid);
      if (!keepSpare && i == 40) break;  // 200 ms with none: no spare
    }
    ASSERT_EQ(before.size(), keepSpare ? 1u : 0u);
    Listener api = listener();
    Output output = makeOutput();
    auto reply = askForFork(client.get(), "first", api, output);
    ASSERT_EQ(reply.error, "");
    if (keepSpare) EXPECT_EQ(reply.pid, before[0]) << "the request did not go to the waiting spare";
    // With a spare: the fork and the next spare.
    std::vector<pid_t> after;
    for (int i = 0; i < 400 && after.size() < (keepSpare ? 2u : 1u); ++i) {
      std::this_thread::sleep_for(5ms);
      after = childrenOf(serverPid);
    }
    EXPECT_EQ(after.size(), keepSpare ? 2u : 1u);
    connectTo(api);  // the fork ends
    EXPECT_EQ(readAll(output.read.get()), "fork first pid " + std::to_string(reply.pid));
    client.reset();
    int status = waitFor(serverPid, 10s);
    ASSERT_NE(status, -1) << "the fork server did not end";
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
    for (pid_t pid : after) EXPECT_NE(::kill(pid, 0), 0) << "pid " << pid << " outlived the server";
  }
}

// With spareDelay the next spare waits that long after a hand-out; a request meanwhile is not
// made to wait for it.
TEST(ForkServerTest, TheNextSpareWaitsForTheDelayButARequestDoesNot) {
  auto [client, server] = ipc::makeForkSocketPair();
  ForkServerLimits limits{std::chrono::milliseconds(0), 64, true};
  limits.spareDelay = 600ms;
  pid_t serverPid = startServer(client, server, limits);
  for (int i = 0; i < 400 && childrenOf(serverPid).empty(); ++i) std::this_thread::sleep_for(5ms);
  ASSERT_EQ(childrenOf(serverPid).size(), 1u) << "no first spare";
  Listener firstApi = listener();
  Output firstOutput = makeOutput();
  ASSERT_EQ(askForFork(client.get(), "first", firstApi, firstOutput).error, "");
  auto handedOut = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(childrenOf(serverPid).size(), 1u) << "the next spare started within the delay";
  // A second request inside the delay forks at once.
  Listener secondApi = listener();
  Output secondOutput = makeOutput();
  auto second = askForFork(client.get(), "second", secondApi, secondOutput);
  ASSERT_EQ(second.error, "");
  EXPECT_LT(std::chrono::steady_clock::now() - handedOut, 600ms);
  // Then, a delay after that hand-out, the next spare.
  std::vector<pid_t> children;
  for (int i = 0; i < 400 && children.size() < 3; ++i) {
    std::this_thread::sleep_for(5ms);
    children = childrenOf(serverPid);
  }
  EXPECT_EQ(children.size(), 3u);
  EXPECT_GE(std::chrono::steady_clock::now() - handedOut, 900ms);
  connectTo(firstApi);
  connectTo(secondApi);
  client.reset();
  int status = waitFor(serverPid, 10s);
  ASSERT_NE(status, -1) << "the fork server did not end";
}

// A spare that dies before its request is replaced at the next request, which still forks.
TEST(ForkServerTest, ARequestAfterTheSpareDiedStartsANewOne) {
  auto [client, server] = ipc::makeForkSocketPair();
  pid_t serverPid = startServer(client, server);
  std::vector<pid_t> spares;
  for (int i = 0; i < 400 && spares.empty(); ++i) {
    std::this_thread::sleep_for(5ms);
    spares = childrenOf(serverPid);
  }
  ASSERT_EQ(spares.size(), 1u);
  ASSERT_EQ(::kill(spares[0], SIGKILL), 0);
  std::this_thread::sleep_for(100ms);  // reaped by the server, or not yet: both must work
  Listener api = listener();
  Output output = makeOutput();
  auto reply = askForFork(client.get(), "after", api, output);
  ASSERT_EQ(reply.error, "");
  EXPECT_NE(reply.pid, spares[0]);
  connectTo(api);
  EXPECT_EQ(readAll(output.read.get()), "fork after pid " + std::to_string(reply.pid));
  client.reset();
  int status = waitFor(serverPid, 10s);
  ASSERT_NE(status, -1) << "the fork server did not end";
}

}  // namespace
}  // namespace clonevm::vmm
