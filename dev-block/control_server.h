#pragma once
// clone-block's DeviceControl API (ipc/capnp/device_control.capnp) on --control-socket:
// Cap'n Proto two-party RPC on a unix socket, served from its own thread with its own kj
// event loop, so a slow client never stalls the vhost-user loop. It reads only the device's
// atomic counters and health flags.
//
//   health  -> healthy unless a virtqueue is broken (the driver sent something the ring
//              walker refused); detail names the image, the front-end state, broken queues.
//   stats   -> "queueN.requests|bytes_read|bytes_written|flushes|errors" and totals
//              ("requests", "bytes_read", ...).
//   configure, attachVhostUser -> refused: clone-block has no runtime configuration and takes
//              its vhost-user socket from --socket-path/--fd.

#include <memory>
#include <string>
#include <thread>

#include <spdlog/logger.h>

#include "common/unique_fd.h"
#include "dev-block/virtio_blk_device.h"

namespace clonevm::block {

class BlockControlServer {
 public:
  BlockControlServer(const VirtioBlkDevice& device, std::string imageDescription,
                     spdlog::logger& log);
  ~BlockControlServer();  // stop()
  BlockControlServer(const BlockControlServer&) = delete;
  BlockControlServer& operator=(const BlockControlServer&) = delete;

  // Listens on `socketPath` (mode 0600) and serves until stop(). Throws clonevm::Error when
  // the socket cannot be set up.
  void start(const std::string& socketPath);
  // Stops serving, removes the socket and joins the thread.
  void stop();

 private:
  void serve(const std::string& socketPath, class StartupReport& report);

  const VirtioBlkDevice& device_;
  std::string imageDescription_;
  spdlog::logger& log_;
  UniqueFd stopFd_;
  std::thread thread_;
};

}  // namespace clonevm::block
