#pragma once
// Test support: a back-end process (clone-block, qemu-storage-daemon, virtiofsd) that serves a
// unix socket, with its output in a log file; stopped (SIGTERM, then SIGKILL) at the end.

#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

namespace clonevm::e2e {

inline constexpr char kQemuStorageDaemon[] = "/usr/bin/qemu-storage-daemon";

class SocketDaemon {
 public:
  SocketDaemon(const std::string& program, std::vector<std::string> args,
               const std::filesystem::path& log, const std::string& socket);
  ~SocketDaemon();
  SocketDaemon(const SocketDaemon&) = delete;
  SocketDaemon& operator=(const SocketDaemon&) = delete;

  // Waits until the socket exists (bound; listening follows at once). False if the process
  // exited first or the time ran out.
  bool waitReady(std::chrono::milliseconds timeout = std::chrono::seconds(20));
  // Sends `signal` and waits (SIGKILL after 5 s). Returns the wait status, or -1 if not running.
  int stop(int signal);
  std::string log() const;

 private:
  std::filesystem::path log_;
  std::string socket_;
  pid_t pid_ = -1;
};

// qemu-storage-daemon's arguments to export `image` (raw, page cache) as a writable
// vhost-user-blk device on `socket` with `queues` queues.
std::vector<std::string> storageDaemonArgs(const std::filesystem::path& image,
                                           const std::string& socket, int queues = 1);

// Up to `length` bytes of `path` from `offset` (fewer at the end of the file).
std::string readFileAt(const std::filesystem::path& path, uint64_t offset, size_t length);

}  // namespace clonevm::e2e
