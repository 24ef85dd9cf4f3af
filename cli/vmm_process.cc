#include "cli/vmm_process.h"

#include <unistd.h>

#include <filesystem>

namespace clonevm::cli {
namespace {

std::string absolute(const std::string& path) {
  return path.empty() ? path : std::filesystem::absolute(path).lexically_normal().string();
}

// "SOCKET[,k=v]" or "SOCKET:TAG[,k=v]": the socket path made absolute, the rest kept.
std::string absoluteSocketOption(const std::string& value, std::vector<std::string>& sockets) {
  auto end = value.find_first_of(",:");
  std::string socket = absolute(value.substr(0, end));
  sockets.push_back(socket);
  return socket + (end == std::string::npos ? "" : value.substr(end));
}

}  // namespace

ProcessSpec vmmProcessSpec(const RunOptions& options, const std::vector<std::string>& globalArgs,
                           const std::string& program, int apiFd) {
  RunOptions jailed = options;
  jailed.kernel = absolute(options.kernel);
  jailed.initrd = absolute(options.initrd);
  jailed.apiSocket = absolute(options.apiSocket);
  std::vector<std::string> sockets;
  for (auto& value : jailed.vhostUserBlk) value = absoluteSocketOption(value, sockets);
  for (auto& value : jailed.vhostUserFs) value = absoluteSocketOption(value, sockets);

  ProcessSpec spec;
  spec.kind = "vmm";
  spec.id = "vm-" + std::to_string(::getpid()) + "-vmm";
  spec.program = program;
  spec.args = vmmArguments(jailed, globalArgs);
  spec.readPaths.push_back(jailed.kernel);
  if (!jailed.initrd.empty()) spec.readPaths.push_back(jailed.initrd);
  if (apiFd >= 0) {
    spec.args.insert(spec.args.end(), {"--api-fd", std::to_string(apiFd)});
    spec.keepFds.push_back(apiFd);
  } else if (!jailed.apiSocket.empty()) {
    // The core creates its API socket, so it needs the directory.
    spec.writePaths.push_back(std::filesystem::path(jailed.apiSocket).parent_path().string());
  }
  for (const auto& socket : sockets) spec.writePaths.push_back(socket);
  spec.devices.push_back("/dev/kvm");
  // The guest agent's transport; clone-vmm boots without it when the host lacks the module.
  if (!options.noVsock && ::access("/dev/vhost-vsock", F_OK) == 0) {
    spec.devices.push_back("/dev/vhost-vsock");
  }
  spec.memoryBytes = options.memoryMib << 20;
  return spec;
}

}  // namespace clonevm::cli
