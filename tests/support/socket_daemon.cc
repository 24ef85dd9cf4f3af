#include "tests/support/socket_daemon.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <thread>

#include <fmt/format.h>

namespace clonevm::e2e {

SocketDaemon::SocketDaemon(const std::string& program, std::vector<std::string> args,
                           const std::filesystem::path& log, const std::string& socket)
    : log_(log), socket_(socket) {
  ::unlink(socket.c_str());
  pid_ = ::fork();
  if (pid_ == 0) {
    int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    int null = ::open("/dev/null", O_RDONLY);
    ::dup2(null, 0);
    std::vector<char*> argv{const_cast<char*>(program.c_str())};
    for (auto& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    ::execv(program.c_str(), argv.data());
    ::_exit(127);
  }
}

SocketDaemon::~SocketDaemon() {
  stop(SIGTERM);
  ::unlink(socket_.c_str());
}

bool SocketDaemon::waitReady(std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    struct stat st {};
    if (::stat(socket_.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) return true;
    if (pid_ > 0 && ::waitpid(pid_, nullptr, WNOHANG) == pid_) {
      pid_ = -1;
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

int SocketDaemon::stop(int signal) {
  if (pid_ <= 0) return -1;
  ::kill(pid_, signal);
  int status = 0;
  for (int i = 0; i < 500; ++i) {
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return status;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::kill(pid_, SIGKILL);
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
  return status;
}

std::string SocketDaemon::log() const {
  std::ifstream in(log_);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::vector<std::string> storageDaemonArgs(const std::filesystem::path& image,
                                           const std::string& socket, int queues) {
  std::string exportArg = fmt::format(
      "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on", socket);
  if (queues > 1) exportArg += fmt::format(",num-queues={}", queues);
  return {"--blockdev",
          fmt::format("driver=file,node-name=f,filename={},cache.direct=off", image.string()),
          "--export", exportArg};
}

std::string readFileAt(const std::filesystem::path& path, uint64_t offset, size_t length) {
  std::ifstream in(path, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset));
  std::string data(length, '\0');
  in.read(data.data(), static_cast<std::streamsize>(length));
  data.resize(static_cast<size_t>(in.gcount()));
  return data;
}

}  // namespace clonevm::e2e
