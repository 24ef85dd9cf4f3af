#pragma once
// clone-block's command line (the vhost-user back-end program conventions of vhost-user.rst
// plus the image and log options), parsed apart from main so it can be tested.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dev-block/image/block_image.h"

namespace clonevm::block {

struct BlockProgramOptions {
  std::string socketPath;  // --socket-path
  int fd = -1;             // --fd
  bool printCapabilities = false;
  std::string imagePath;
  ImageFormat format = ImageFormat::kAuto;
  bool readOnly = false;
  uint16_t queues = 1;
  std::string serial = "clone-block";
  std::string controlSocket;  // --control-socket
  std::string logLevel = "info";
  bool logJson = false;
  std::string seccomp = "kill";  // --seccomp kill|log|off (jailer/seccomp/seccomp_policy.h)
  // --userfaultfd: offer vhost-user postcopy (PAGEFAULT), with userfaultfds made from
  // /dev/userfaultfd, opened at startup (a fork's disks: its core resolves their faults).
  bool userfaultfd = false;
  // --overlay-over BACKING: --image is created first, as a new qcow2 overlay over BACKING (a
  // fork server's spare makes its disks this way, inside its jail; docs/FORK.md).
  std::string overlayOver;
};

// Either the options, or the exit code after CLI11 printed help or an error (`exitCode`).
struct ParsedBlockOptions {
  std::optional<BlockProgramOptions> options;
  int exitCode = 0;
};

// Parses and checks the combinations (exactly one of --socket-path and --fd, --image unless
// --print-capabilities, --overlay-over only with a writable qcow2 --image). Usage errors exit with 2 after printing to stderr.
ParsedBlockOptions parseBlockOptions(int argc, const char* const* argv);

// The --print-capabilities document.
std::string blockCapabilities();

}  // namespace clonevm::block
