#include "dev-block/block_options.h"

#include <iostream>

#include <CLI/CLI.hpp>

#include "common/error.h"
#include "dev-block/image/open_image.h"
#include "ipc/vhost-user/backend.h"

namespace clonevm::block {

namespace {
constexpr int kExitUsage = 2;
}

std::string blockCapabilities() {
  // vhost-user.rst lists no features for vhost-user-blk but these; we honour both.
  return ipc::vhost::capabilitiesJson("block", {"read-only", "blk-file"});
}

ParsedBlockOptions parseBlockOptions(int argc, const char* const* argv) {
  BlockProgramOptions options;
  std::string format = "auto";
  CLI::App app{"clone-block: a vhost-user-blk back-end serving a raw or qcow2 image"};
  app.name("clone-block");
  app.add_option("--socket-path", options.socketPath, "listen for the front-end on this unix socket");
  app.add_option("--fd", options.fd, "serve this inherited socket (listening or connected)")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--print-capabilities", options.printCapabilities,
               "print the back-end's capabilities (JSON) and exit");
  app.add_option("--image", options.imagePath, "the disk image");
  app.add_option("--format", format, "raw|qcow2|auto (auto reads the header)")
      ->check(CLI::IsMember({"raw", "qcow2", "auto"}))
      ->capture_default_str();
  app.add_flag("--readonly", options.readOnly, "serve the disk read-only (VIRTIO_BLK_F_RO)");
  app.add_option("--queues", options.queues, "number of virtqueues (MQ)")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  app.add_option("--serial", options.serial, "the disk's serial (GET_ID), at most 20 bytes")
      ->check([](const std::string& value) {
        return value.size() <= 20 ? std::string() : std::string("at most 20 bytes");
      })
      ->capture_default_str();
  app.add_option("--control-socket", options.controlSocket,
                 "serve the DeviceControl API (Cap'n Proto: health, stats) on this unix socket");
  app.add_option("--log-level", options.logLevel, "trace|debug|info|warn|error|off")
      ->capture_default_str();
  app.add_flag("--log-json", options.logJson, "log one JSON object a line");
  app.add_option("--seccomp", options.seccomp,
                 "kill|log|off: the seccomp policy installed after setup, before the first "
                 "vhost-user message; log lets violations through and logs them to the kernel "
                 "audit log (docs/JAILER.md)")
      ->check(CLI::IsMember({"kill", "log", "off"}))
      ->capture_default_str();
  app.add_flag("--userfaultfd", options.userfaultfd,
               "offer vhost-user postcopy: a fork's core then fills the guest pages this "
               "process touches first (needs /dev/userfaultfd; docs/FORK.md)");
  app.add_option("--overlay-over", options.overlayOver,
                 "create --image (which must not exist) as a new qcow2 overlay over this image, "
                 "then serve it");
  ParsedBlockOptions result;
  try {
    app.parse(argc, argv);
    if (!options.printCapabilities) {
      if (options.socketPath.empty() == (options.fd < 0)) {
        throw CLI::ValidationError("give exactly one of --socket-path and --fd");
      }
      if (options.imagePath.empty()) throw CLI::RequiredError("--image");
    }
    if (!options.overlayOver.empty() && (options.readOnly || (format != "qcow2" && format != "auto"))) {
      throw CLI::ValidationError("--overlay-over makes a writable qcow2 image: not with --readonly "
                                 "or --format " + format);
    }
    options.format = format == "auto" ? ImageFormat::kAuto : parseImageFormat(format);
  } catch (const CLI::ParseError& error) {
    int code = app.exit(error, std::cout, std::cerr);
    result.exitCode = code == 0 ? 0 : kExitUsage;
    return result;
  }
  result.options = options;
  return result;
}

}  // namespace clonevm::block
