// clone-block: the virtio-blk device process. Serves one raw or qcow2 image to a vhost-user
// front-end (clone-vmm, QEMU's vhost-user-blk-pci). Options: block_options.h; docs/BLOCK.md.

#include <pthread.h>
#include <signal.h>

#include <iostream>
#include <thread>

#include "common/error.h"
#include "common/log.h"
#include "common/userfaultfd.h"
#include "dev-block/block_options.h"
#include "dev-block/control_server.h"
#include "dev-block/image/block_image.h"
#include "dev-block/virtio_blk_device.h"
#include "ipc/vhost-user/backend.h"
#include "ipc/vhost-user/channel.h"
#include "jailer/seccomp/seccomp_policy.h"

namespace clonevm::block {
namespace {

constexpr int kExitError = 1;

// SIGTERM and SIGINT stop the back-end; they are taken by a thread with sigwait, so no
// handler and no global is needed. SIGUSR1 tells that thread to end.
sigset_t stopSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGUSR1);
  return set;
}

int runBlock(int argc, char** argv) {
  ParsedBlockOptions parsed = parseBlockOptions(argc, argv);
  if (!parsed.options) return parsed.exitCode;
  const BlockProgramOptions& options = *parsed.options;
  if (options.printCapabilities) {
    std::cout << blockCapabilities();
    return 0;
  }
  std::shared_ptr<spdlog::logger> log;
  try {
    log = makeLogger("block", {parseLogLevel(options.logLevel),
                               options.logJson ? LogFormat::kJson : LogFormat::kText});
  } catch (const std::exception& error) {
    std::cerr << "clone-block: " << error.what() << "\n";
    return 2;
  }
  sigset_t signals = stopSignals();
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);  // before any thread exists
  try {
    if (!options.overlayOver.empty()) {
      createQcow2Overlay(options.imagePath, options.overlayOver, ImageFormat::kAuto);
      log->info("created {} as an overlay over {}", options.imagePath, options.overlayOver);
    }
    std::unique_ptr<BlockImage> image =
        openImage({options.imagePath, options.format, options.readOnly});
    log->info("image {}: {}, {} bytes{}", options.imagePath, image->describe(),
              image->virtualSize(), options.readOnly || image->readOnly() ? ", read-only" : "");
    BlkDeviceOptions deviceOptions;
    deviceOptions.queues = options.queues;
    deviceOptions.readOnly = options.readOnly;
    deviceOptions.serial = options.serial;
    VirtioBlkDevice device(*image, deviceOptions, *log);
    ipc::vhost::BackendOptions backendOptions;
    UniqueFd userfaultfdDevice;
    if (options.userfaultfd) {
      userfaultfdDevice = openUserfaultfdDevice();
      backendOptions.newUserfaultfd = [device = userfaultfdDevice.get()] {
        return newUserfaultfd(device);
      };
    }
    ipc::vhost::VhostUserBackend backend(device, *log, backendOptions);
    std::unique_ptr<BlockControlServer> control;
    if (!options.controlSocket.empty()) {
      control = std::make_unique<BlockControlServer>(
          device, fmt::format("{} ({})", options.imagePath, image->describe()), *log);
      control->start(options.controlSocket);
    }

    UniqueFd socket = options.fd >= 0 ? UniqueFd(options.fd)
                                      : ipc::vhost::listenUnixSocket(options.socketPath);
    std::thread signalThread([&backend, &log, signals] {
      int signal = 0;
      while (sigwait(&signals, &signal) == 0 && signal != SIGUSR1) {
        log->info("signal {}: stopping", signal);
        backend.stop();
      }
    });
    struct JoinSignalThread {
      std::thread& thread;
      ~JoinSignalThread() {
        pthread_kill(thread.native_handle(), SIGUSR1);
        thread.join();
      }
    } joinSignalThread{signalThread};

    // Setup is done (image and backing files open, io_uring rings, sockets listening, signal
    // thread running); lock down before the first vhost-user message, which the guest's
    // driver state shapes.
    seccomp::install(seccomp::Kind::kBlock, seccomp::parseMode(options.seccomp));
    log->info("clone-block serving {} on {}", options.imagePath,
              options.fd >= 0 ? fmt::format("fd {}", options.fd) : options.socketPath);
    backend.serveFd(std::move(socket));
    if (!device.readOnly()) image->flush();
    return 0;
  } catch (const std::exception& error) {
    log->error("{}", error.what());
    return kExitError;
  }
}

}  // namespace
}  // namespace clonevm::block

int main(int argc, char** argv) { return clonevm::block::runBlock(argc, argv); }
