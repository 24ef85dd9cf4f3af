#include "vmm-core/api/fork_server.h"

#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace clonevm::vmm {
namespace {

using Clock = std::chrono::steady_clock;

std::string describeStatus(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with code {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return fmt::format("was killed by signal {}", WTERMSIG(status));
  return fmt::format("ended (status {:#x})", status);
}

bool isListening(int socket) {
  int listening = 0;
  socklen_t length = sizeof(listening);
  return ::getsockopt(socket, SOL_SOCKET, SO_ACCEPTCONN, &listening, &length) == 0 && listening == 1;
}

// A child that prepares the next fork; the server hands it its request on `socket`.
struct Spare {
  pid_t pid = 0;
  UniqueFd socket;
  Clock::time_point started;
  std::optional<uint32_t> vsockCid;  // once it has announced itself (SpareFork::announce)
};

// A restore takes ~0.1 s; one that has not finished in this long is taken for hung.
constexpr int kAnnounceTimeoutMs = 30000;

// Waits for the spare's announcement. False (logged): it ended, sent something else, or hung.
bool awaitAnnouncement(Spare& spare, spdlog::logger& log) {
  if (spare.vsockCid) return true;
  pollfd ready{spare.socket.get(), POLLIN, 0};
  int events = ::poll(&ready, 1, kAnnounceTimeoutMs);
  if (events <= 0) {
    log.warn("fork server: its spare (pid {}) did not announce itself in {} ms", spare.pid, kAnnounceTimeoutMs);
    return false;
  }
  try {
    spare.vsockCid = ipc::receiveForkReply(spare.socket.get()).vsockCid;
    return true;
  } catch (const Error& error) {
    log.warn("fork server: its spare (pid {}) did not announce itself: {}", spare.pid, error.what());
    return false;
  }
}

}  // namespace

std::optional<ipc::ForkRequest> SpareFork::takeRequest() {
  try {
    return ipc::receiveForkRequest(fromServer_.get());
  } catch (const ipc::ForkSocketClosed&) {
    return std::nullopt;
  }
}

void SpareFork::announce(uint32_t vsockCid) {
  ipc::sendForkReply(fromServer_.get(), {.pid = ::getpid(), .vsockCid = vsockCid});
}

bool SpareFork::requestWaiting() const {
  pollfd waiting{fromServer_.get(), POLLIN, 0};
  return ::poll(&waiting, 1, 0) > 0;
}

std::optional<SpareFork> serveForks(int socket, const ForkServerLimits& limits, spdlog::logger& log) {
  sigset_t childSignal, previousMask;
  sigemptyset(&childSignal);
  sigaddset(&childSignal, SIGCHLD);
  CLONE_SYSCALL(::sigprocmask(SIG_BLOCK, &childSignal, &previousMask), "fork server: block SIGCHLD");
  UniqueFd childEvents(CLONE_SYSCALL(::signalfd(-1, &childSignal, SFD_CLOEXEC), "fork server: create signalfd"));
  std::map<pid_t, std::string> forks;  // running forks by pid: their ids, for the log
  bool listening = isListening(socket);
  std::vector<UniqueFd> clients;
  if (!listening) clients.emplace_back(::dup(socket));  // the one client; `socket` stays the caller's
  require(listening || clients.back().valid(), "fork server: dup its socket: {}", std::strerror(errno));
  std::optional<Clock::time_point> idleSince;  // since the last fork or client went
  std::optional<Clock::time_point> handedOutAt;  // the last fork, for limits.spareDelay
  std::optional<Spare> spare;
  // A spare that ended before its request is not replaced ahead (no retry loop when every
  // restore fails); the next request starts one.
  bool spareFailed = false;
  std::optional<SpareFork> child;  // set in a child of startSpare()
  auto startSpare = [&] {
    auto [serverEnd, childEnd] = ipc::makeForkSocketPair();
    pid_t pid = ::fork();
    if (pid == 0) {
      // The spare: none of the server's fds or its signal handling.
      ::sigprocmask(SIG_SETMASK, &previousMask, nullptr);
      childEvents.reset();
      clients.clear();
      ::close(socket);
      serverEnd.reset();
      // Forks of one server share a uid: none may trace or read another's memory.
      ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
      child.emplace(std::move(childEnd));
      return;
    }
    if (pid < 0) {
      log.error("fork server: fork() a spare: {}", std::strerror(errno));
      return;
    }
    spare = Spare{pid, std::move(serverEnd), Clock::now()};
  };
  auto endSpare = [&] {
    ::kill(spare->pid, SIGKILL);
    ::waitpid(spare->pid, nullptr, 0);
    if (limits.spareEnded) limits.spareEnded(spare->pid);
    spare.reset();
  };
  log.info("fork server: ready ({}{})", listening ? fmt::format("listening; at most {} forks, ends {} ms after "
                                                                "the last fork and client", limits.maxForks,
                                                                limits.linger.count())
                                                  : "one client",
           limits.keepSpare ? "; a spare fork prepared ahead" : "");
  for (;;) {
    // Reap every fork that ended (one SIGCHLD may stand for several).
    for (;;) {
      int status = 0;
      pid_t pid = ::waitpid(-1, &status, WNOHANG);
      if (pid <= 0) break;
      if (spare && pid == spare->pid) {
        log.warn("fork server: its spare (pid {}) {} before it had a request", pid, describeStatus(status));
        if (limits.spareEnded) limits.spareEnded(pid);
        spare.reset();
        spareFailed = true;
        continue;
      }
      auto fork = forks.find(pid);
      log.info("fork server: fork {} (pid {}) {}", fork != forks.end() ? fork->second : "?", pid,
               describeStatus(status));
      if (fork != forks.end()) forks.erase(fork);
    }
    bool idle = forks.empty() && clients.empty();
    if (!idle) idleSince.reset();
    else if (!idleSince) idleSince = Clock::now();
    auto idleFor = idle ? std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - *idleSince)
                        : std::chrono::milliseconds(0);
    if (idle && (!listening || idleFor >= limits.linger)) {
      if (spare) endSpare();
      log.info("fork server: no fork runs and no client is connected: done");
      return std::nullopt;
    }
    int spareDelayLeft = -1;  // ms; -1: none
    if (handedOutAt) {
      auto since = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - *handedOutAt);
      if (since < limits.spareDelay) spareDelayLeft = static_cast<int>((limits.spareDelay - since).count()) + 1;
    }
    if (limits.keepSpare && !spare && !spareFailed && forks.size() < limits.maxForks &&
        spareDelayLeft < 0) {
      startSpare();
      if (child) return child;
    }
    std::vector<pollfd> fds = {{childEvents.get(), POLLIN, 0}, {listening ? socket : -1, POLLIN, 0}};
    for (const auto& client : clients) fds.push_back({client.get(), POLLIN, 0});
    int timeout = idle ? static_cast<int>((limits.linger - idleFor).count()) : -1;
    if (spareDelayLeft >= 0 && (timeout < 0 || spareDelayLeft < timeout)) timeout = spareDelayLeft;
    CLONE_SYSCALL(::poll(fds.data(), fds.size(), timeout), "fork server: poll");
    if (fds[0].revents & POLLIN) {
      signalfd_siginfo info;
      (void)!::read(childEvents.get(), &info, sizeof(info));
    }
    if (fds[1].revents & POLLIN) {
      UniqueFd client(::accept4(socket, nullptr, nullptr, SOCK_CLOEXEC));
      if (client) clients.push_back(std::move(client));
    }
    // Each client with a request (or hang-up): one request each per round.
    std::vector<int> ready;
    for (size_t i = 2; i < fds.size(); ++i) {
      if (fds[i].revents != 0) ready.push_back(fds[i].fd);
    }
    for (int client : ready) {
      auto drop = [&] {
        std::erase_if(clients, [client](const UniqueFd& fd) { return fd.get() == client; });
      };
      ipc::ForkRequest request;
      ipc::ForkReply reply;
      try {
        request = ipc::receiveForkRequest(client);
      } catch (const ipc::ForkSocketClosed&) {
        drop();
        continue;
      } catch (const Error& error) {
        log.warn("fork server: refused a request: {}", error.what());
        reply.error = error.what();
      }
      if (reply.error.empty() && forks.size() >= limits.maxForks) {
        reply.error = fmt::format("the fork server runs {} forks, its most: refused {}", forks.size(),
                                  request.forkId);
        log.warn("fork server: {}", reply.error);
      }
      // Hand the request to the spare, or to a new one if there is none or it has died (a
      // spare still restoring is waited for: the reply names the CID it took).
      for (int attempt = 0; reply.error.empty() && reply.pid == 0 && attempt < 2; ++attempt) {
        if (!spare) {
          startSpare();
          if (child) return child;
          if (!spare) {
            reply.error = fmt::format("fork server: fork() for {}: {}", request.forkId, std::strerror(errno));
            break;
          }
        }
        if (!awaitAnnouncement(*spare, log)) {
          endSpare();
          continue;
        }
        try {
          ipc::sendForkRequest(spare->socket.get(), request);
        } catch (const Error& error) {
          log.warn("fork server: its spare (pid {}) could not take {}: {}", spare->pid, request.forkId,
                   error.what());
          endSpare();
          continue;
        }
        auto preparedFor = std::chrono::duration<double, std::milli>(Clock::now() - spare->started).count();
        reply.pid = spare->pid;
        reply.vsockCid = request.vsockCid != 0 ? request.vsockCid : *spare->vsockCid;
        forks.emplace(spare->pid, request.forkId);
        log.info("fork server: fork {} started as pid {} (API {}; its spare started {:.1f} ms before)",
                 request.forkId, spare->pid, request.apiSocketName, preparedFor);
        spare.reset();
        spareFailed = false;
        handedOutAt = Clock::now();
      }
      try {
        ipc::sendForkReply(client, reply);
      } catch (const Error&) {
        drop();  // it hung up meanwhile
      }
    }
  }
}

}  // namespace clonevm::vmm
