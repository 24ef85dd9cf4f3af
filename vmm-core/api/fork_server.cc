#include "vmm-core/api/fork_server.h"

#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <string>

namespace clonevm::vmm {
namespace {

std::string describeStatus(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with code {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return fmt::format("was killed by signal {}", WTERMSIG(status));
  return fmt::format("ended (status {:#x})", status);
}

}  // namespace

std::optional<ipc::ForkRequest> serveForks(int socket, spdlog::logger& log) {
  sigset_t childSignal, previousMask;
  sigemptyset(&childSignal);
  sigaddset(&childSignal, SIGCHLD);
  CLONE_SYSCALL(::sigprocmask(SIG_BLOCK, &childSignal, &previousMask), "fork server: block SIGCHLD");
  UniqueFd childEvents(CLONE_SYSCALL(::signalfd(-1, &childSignal, SFD_CLOEXEC), "fork server: create signalfd"));
  std::map<pid_t, std::string> forks;  // running forks by pid: their ids, for the log
  bool clientGone = false;
  log.info("fork server: ready");
  for (;;) {
    // Reap every fork that ended (one SIGCHLD may stand for several).
    for (;;) {
      int status = 0;
      pid_t pid = ::waitpid(-1, &status, WNOHANG);
      if (pid <= 0) break;
      auto fork = forks.find(pid);
      log.info("fork server: fork {} (pid {}) {}", fork != forks.end() ? fork->second : "?", pid,
               describeStatus(status));
      if (fork != forks.end()) forks.erase(fork);
    }
    if (clientGone && forks.empty()) {
      log.info("fork server: the client hung up and no fork runs: done");
      return std::nullopt;
    }
    pollfd fds[2] = {{childEvents.get(), POLLIN, 0}, {clientGone ? -1 : socket, POLLIN, 0}};
    CLONE_SYSCALL(::poll(fds, 2, -1), "fork server: poll");
    if (fds[0].revents & POLLIN) {
      signalfd_siginfo info;
      (void)!::read(childEvents.get(), &info, sizeof(info));
    }
    if (fds[1].revents == 0) continue;
    ipc::ForkRequest request;
    try {
      request = ipc::receiveForkRequest(socket);
    } catch (const ipc::ForkSocketClosed&) {
      clientGone = true;
      continue;
    } catch (const Error& error) {
      log.warn("fork server: refused a request: {}", error.what());
      try {
        ipc::sendForkReply(socket, {0, error.what()});
      } catch (const Error&) {
        clientGone = true;  // it hung up meanwhile
      }
      continue;
    }
    pid_t pid = ::fork();
    if (pid == 0) {
      // The fork: none of the server's fds or its signal handling.
      ::sigprocmask(SIG_SETMASK, &previousMask, nullptr);
      childEvents.reset();
      ::close(socket);
      // Forks of one server share a uid: none may trace or read another's memory.
      ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
      return request;
    }
    ipc::ForkReply reply;
    if (pid < 0) {
      reply.error = fmt::format("fork server: fork() for {}: {}", request.forkId, std::strerror(errno));
      log.error("{}", reply.error);
    } else {
      forks.emplace(pid, request.forkId);
      reply.pid = pid;
      log.info("fork server: fork {} started as pid {} (API {})", request.forkId, pid,
               request.apiSocketName);
    }
    try {
      ipc::sendForkReply(socket, reply);
    } catch (const Error&) {
      clientGone = true;
    }
  }
}

}  // namespace clonevm::vmm
