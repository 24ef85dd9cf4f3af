#include "cli/disk_record.h"

#include <fcntl.h>
#include <unistd.h>

#include <fstream>
#include <iterator>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/unique_fd.h"

namespace clonevm::cli {

std::string socketFileBase(const std::string& apiSocket) {
  return apiSocket.ends_with(".sock") ? apiSocket.substr(0, apiSocket.size() - 5) : apiSocket;
}

std::string diskRecordPath(const std::string& apiSocket) { return socketFileBase(apiSocket) + ".disks"; }

void writeDiskRecord(const std::string& apiSocket, const std::vector<RecordedDisk>& disks) {
  nlohmann::json list = nlohmann::json::array();
  for (const auto& disk : disks) {
    nlohmann::json entry = {{"image", disk.image}, {"format", disk.format}};
    if (!disk.coreImage.empty()) entry["core_image"] = disk.coreImage;
    list.push_back(entry);
  }
  std::string text = list.dump() + "\n";
  std::string path = diskRecordPath(apiSocket);
  ::unlink(path.c_str());
  UniqueFd fd(CLONE_SYSCALL(::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600),
                            "create disk record", path));
  CLONE_SYSCALL(::write(fd.get(), text.data(), text.size()), "write disk record", path);
}

std::vector<RecordedDisk> readDiskRecord(const std::string& apiSocket) {
  std::string path = diskRecordPath(apiSocket);
  std::ifstream in(path, std::ios::binary);
  require(in.good(), "{}: no record of the VM's disks (a VM with disks started by `clone run` or "
                     "`clone fork` has one next to its API socket)", path);
  std::string text((std::istreambuf_iterator<char>(in)), {});
  std::vector<RecordedDisk> disks;
  try {
    for (const auto& entry : nlohmann::json::parse(text)) {
      disks.push_back({entry.at("image").get<std::string>(), entry.at("format").get<std::string>(),
                       entry.value("core_image", std::string())});
    }
  } catch (const nlohmann::json::exception& error) {
    throw Error(fmt::format("{}: a damaged disk record: {}", path, error.what()));
  }
  return disks;
}

void removeDiskRecord(const std::string& apiSocket) { ::unlink(diskRecordPath(apiSocket).c_str()); }

void requireRecordedDisks(const vmm::snapshot::Manifest& manifest,
                          const std::vector<RecordedDisk>& recorded, const std::string& record) {
  require(manifest.disks.size() == recorded.size(),
          "the VM's manifest lists {} disks, but it was started with {} ({}): refusing to copy "
          "any (a compromised VMM?)", manifest.disks.size(), recorded.size(), record);
  for (size_t i = 0; i < recorded.size(); ++i) {
    const auto& disk = manifest.disks[i];
    const std::string& coreName = recorded[i].coreImage.empty() ? recorded[i].image : recorded[i].coreImage;
    require(disk.source == coreName && disk.sourceFormat == recorded[i].format,
            "the VM's manifest names disk {} as {} ({}), but it was started with {} ({}) ({}): "
            "refusing to copy it (a compromised VMM?)", i, disk.source, disk.sourceFormat,
            coreName, recorded[i].format, record);
  }
}

}  // namespace clonevm::cli
