#include "vmm-core/snapshot/template_files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <ctime>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <sha2.h>

#include "common/error.h"
#include "common/unique_fd.h"

namespace clonevm::vmm::snapshot {
namespace {

using nlohmann::json;

constexpr const char* kFormatName = "clone-template";
constexpr size_t kSampleCount = 32;

std::string join(const std::string& dir, const std::string& name) { return dir + "/" + name; }

bool allZero(const uint8_t* page, size_t size) {
  const uint64_t* words = reinterpret_cast<const uint64_t*>(page);
  for (size_t i = 0; i < size / 8; ++i) {
    if (words[i] != 0) return false;
  }
  return true;
}

void preadAll(int fd, uint8_t* buffer, size_t size, uint64_t offset, const std::string& path) {
  while (size > 0) {
    ssize_t n = ::pread(fd, buffer, size, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throwSystemError(errno, "read", path);
    require(n > 0, "{}: unexpected end of file at byte {}", path, offset);
    buffer += n;
    size -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

void pwriteAll(int fd, const uint8_t* buffer, size_t size, uint64_t offset, const std::string& path) {
  while (size > 0) {
    ssize_t n = ::pwrite(fd, buffer, size, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throwSystemError(errno, "write", path);
    buffer += n;
    size -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

std::vector<uint8_t> readWholeFile(const std::string& path, size_t limit) {
  UniqueFd fd(CLONE_SYSCALL(::open(path.c_str(), O_RDONLY | O_CLOEXEC), "open", path));
  struct stat st {};
  CLONE_SYSCALL(::fstat(fd.get(), &st), "stat", path);
  require(static_cast<uint64_t>(st.st_size) <= limit, "{}: {} bytes is too large", path,
          st.st_size);
  std::vector<uint8_t> bytes(static_cast<size_t>(st.st_size));
  if (!bytes.empty()) preadAll(fd.get(), bytes.data(), bytes.size(), 0, path);
  return bytes;
}

// Pages whose hashes the manifest keeps: spread evenly over the data, so that a change of
// the image's content in a place nobody checks is unlikely to go unnoticed for long, yet
// the check reads only kSampleCount pages.
std::vector<uint64_t> sampleOffsets(const std::vector<Extent>& extents, uint64_t dataBytes) {
  std::vector<uint64_t> offsets;
  if (dataBytes == 0) return offsets;
  uint64_t stride = std::max<uint64_t>(dataBytes / kSampleCount, kPageSize);
  uint64_t position = 0;  // in data bytes
  for (const auto& extent : extents) {
    while (position < extent.length && offsets.size() < kSampleCount) {
      offsets.push_back((extent.offset + position) / kPageSize * kPageSize);
      position += stride;
    }
    position -= std::min(position, extent.length);
  }
  return offsets;
}

}  // namespace

std::string currentUtcTime() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char text[32];
  std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return text;
}

std::string sha256Hex(const void* data, size_t size) {
  SHA2_CTX context;
  SHA256Init(&context);
  SHA256Update(&context, static_cast<const uint8_t*>(data), size);
  std::array<uint8_t, SHA256_DIGEST_LENGTH> digest{};
  SHA256Final(digest.data(), &context);
  std::string hex;
  for (uint8_t byte : digest) hex += fmt::format("{:02x}", byte);
  return hex;
}

std::string sha256Hex(const std::vector<Extent>& extents) {
  return sha256Hex(extents.data(), extents.size() * sizeof(Extent));
}

std::vector<Extent> dataExtents(int fd, uint64_t size, const std::string& path) {
  std::vector<Extent> extents;
  uint64_t at = 0;
  while (at < size) {
    off_t data = ::lseek(fd, static_cast<off_t>(at), SEEK_DATA);
    if (data < 0 && errno == ENXIO) break;
    if (data < 0) throwSystemError(errno, "SEEK_DATA", path);
    off_t hole = ::lseek(fd, data, SEEK_HOLE);
    if (hole < 0) throwSystemError(errno, "SEEK_HOLE", path);
    uint64_t end = std::min<uint64_t>(static_cast<uint64_t>(hole), size);
    if (end > static_cast<uint64_t>(data)) {
      extents.push_back({static_cast<uint64_t>(data), end - static_cast<uint64_t>(data)});
    }
    at = end;
  }
  return extents;
}

UniqueFd createTemplateFile(int dirFd, const std::string& dirPath, const std::string& name,
                            mode_t mode) {
  std::string path = join(dirPath, name);
  const std::string& relative = dirFd == AT_FDCWD ? path : name;
  return UniqueFd(CLONE_SYSCALL(
      ::openat(dirFd, relative.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode),
      "create", path));
}

std::vector<Extent> writeSparseMemoryImage(int memoryFd, uint64_t size, int out,
                                           const std::string& path, const uint8_t* mapping) {
  CLONE_SYSCALL(::ftruncate(out, static_cast<off_t>(size)), "size memory image", path);
  constexpr size_t kBuffer = 2 << 20;
  std::vector<uint8_t> buffer(kBuffer);
  // Only the memfd's data extents can hold non-zero pages: pages never touched are holes.
  auto extents = mapping != nullptr ? std::vector<Extent>{{0, size}}
                                     : dataExtents(memoryFd, size, "guest memory memfd");
  for (const auto& extent : extents) {
    for (uint64_t at = extent.offset; at < extent.offset + extent.length; at += kBuffer) {
      size_t chunk = static_cast<size_t>(std::min<uint64_t>(kBuffer, extent.offset + extent.length - at));
      if (mapping != nullptr) {
        std::memcpy(buffer.data(), mapping + at, chunk);
      } else {
        preadAll(memoryFd, buffer.data(), chunk, at, "guest memory memfd");
      }
      size_t runStart = 0;
      bool inRun = false;
      for (size_t page = 0; page <= chunk; page += kPageSize) {
        bool data = page < chunk && !allZero(buffer.data() + page, std::min<size_t>(kPageSize, chunk - page));
        if (data && !inRun) {
          runStart = page;
          inRun = true;
        } else if (!data && inRun) {
          pwriteAll(out, buffer.data() + runStart, page - runStart, at + runStart, path);
          inRun = false;
        }
      }
    }
  }
  CLONE_SYSCALL(::fchmod(out, 0444), "make memory image read-only", path);
  return dataExtents(out, size, path);
}

void describeMemoryImage(int fd, uint64_t size, const std::vector<Extent>& extents,
                         Manifest& manifest, const std::string& path) {
  manifest.memorySize = size;
  manifest.memoryExtentCount = extents.size();
  manifest.memoryExtentsSha256 = sha256Hex(extents);
  manifest.memoryDataBytes = 0;
  for (const auto& e : extents) manifest.memoryDataBytes += e.length;
  manifest.memorySamples.clear();
  std::vector<uint8_t> page(kPageSize);
  for (uint64_t offset : sampleOffsets(extents, manifest.memoryDataBytes)) {
    preadAll(fd, page.data(), page.size(), offset, path);
    manifest.memorySamples.push_back({offset, sha256Hex(page.data(), page.size())});
  }
}

std::string toJson(const Manifest& m) {
  json regions = json::array();
  for (const auto& r : m.regions) {
    regions.push_back({{"guest_address", r.guestAddress}, {"size", r.size}, {"file_offset", r.fileOffset}});
  }
  json cpuid = json::array();
  for (const auto& c : m.cpuid) {
    cpuid.push_back({c.function, c.index, c.flags, c.eax, c.ebx, c.ecx, c.edx});
  }
  json samples = json::array();
  for (const auto& s : m.memorySamples) samples.push_back({{"offset", s.offset}, {"sha256", s.sha256}});
  json disks = json::array();
  for (const auto& d : m.disks) {
    disks.push_back({{"file", d.file},
                     {"source", d.source},
                     {"source_format", d.sourceFormat},
                     {"bytes", d.bytes},
                     {"read_only", d.readOnly},
                     {"queues", d.queues},
                     {"sha256", d.sha256}});
  }
  json doc = {
      {"format", kFormatName},
      {"version", m.version},
      {"created", m.createdUtc},
      {"machine",
       {{"memory_bytes", m.memoryBytes},
        {"regions", regions},
        {"vcpus", m.vcpus},
        {"kernel", m.kernel},
        {"initrd", m.initrd},
        {"cmdline", m.cmdline},
        {"devices", m.devices}}},
      {"cpuid", {{"columns", {"function", "index", "flags", "eax", "ebx", "ecx", "edx"}},
                 {"leaves", cpuid}}},
      {"state", {{"file", kStateFile}, {"size", m.stateSize}, {"sha256", m.stateSha256}}},
      {"memory",
       {{"file", kMemoryFile},
        {"size", m.memorySize},
        {"data_bytes", m.memoryDataBytes},
        {"extent_count", m.memoryExtentCount},
        {"extents_sha256", m.memoryExtentsSha256},
        {"samples", samples}}},
      {"disks", disks},
  };
  return doc.dump(2) + "\n";
}

Manifest manifestFromJson(const std::string& text, const std::string& what) {
  try {
    json doc = json::parse(text);
    require(doc.value("format", "") == kFormatName, "{}: not a Clone template manifest", what);
    Manifest m;
    m.version = doc.at("version").get<uint32_t>();
    require(m.version == kTemplateVersion,
            "{}: template format version {} (this build reads version {})", what, m.version,
            kTemplateVersion);
    m.createdUtc = doc.value("created", "");
    const auto& machine = doc.at("machine");
    m.memoryBytes = machine.at("memory_bytes").get<uint64_t>();
    for (const auto& r : machine.at("regions")) {
      m.regions.push_back({r.at("guest_address").get<uint64_t>(), r.at("size").get<uint64_t>(),
                           r.at("file_offset").get<uint64_t>()});
    }
    m.vcpus = machine.at("vcpus").get<uint32_t>();
    m.kernel = machine.value("kernel", "");
    m.initrd = machine.value("initrd", "");
    m.cmdline = machine.value("cmdline", "");
    m.devices = machine.at("devices").get<std::vector<std::string>>();
    for (const auto& c : doc.at("cpuid").at("leaves")) {
      m.cpuid.push_back({c.at(0).get<uint32_t>(), c.at(1).get<uint32_t>(), c.at(2).get<uint32_t>(),
                         c.at(3).get<uint32_t>(), c.at(4).get<uint32_t>(), c.at(5).get<uint32_t>(),
                         c.at(6).get<uint32_t>()});
    }
    const auto& state = doc.at("state");
    m.stateSize = state.at("size").get<uint64_t>();
    m.stateSha256 = state.at("sha256").get<std::string>();
    const auto& memory = doc.at("memory");
    m.memorySize = memory.at("size").get<uint64_t>();
    m.memoryDataBytes = memory.at("data_bytes").get<uint64_t>();
    m.memoryExtentCount = memory.at("extent_count").get<uint64_t>();
    m.memoryExtentsSha256 = memory.at("extents_sha256").get<std::string>();
    for (const auto& s : memory.at("samples")) {
      m.memorySamples.push_back({s.at("offset").get<uint64_t>(), s.at("sha256").get<std::string>()});
    }
    if (doc.contains("disks")) {
      for (const auto& d : doc.at("disks")) {
        TemplateDisk disk;
        disk.file = d.at("file").get<std::string>();
        disk.source = d.value("source", "");
        disk.sourceFormat = d.value("source_format", "");
        disk.bytes = d.at("bytes").get<uint64_t>();
        disk.readOnly = d.value("read_only", false);
        disk.queues = d.value("queues", uint16_t{1});
        disk.sha256 = d.value("sha256", "");
        // The file name is joined to the template directory: no way out of it.
        require(!disk.file.empty() && disk.file.find('/') == std::string::npos &&
                    disk.file[0] != '.',
                "{}: disk file name '{}' is not a plain name", what, disk.file);
        require(disk.bytes > 0 && disk.bytes % 512 == 0, "{}: disk {} has {} bytes", what,
                disk.file, disk.bytes);
        require(disk.queues >= 1 && disk.queues <= 64, "{}: disk {} has {} queues", what,
                disk.file, disk.queues);
        m.disks.push_back(std::move(disk));
      }
    }
    require(m.memorySize == m.memoryBytes, "{}: memory image size {} differs from the machine's {}",
            what, m.memorySize, m.memoryBytes);
    require(m.vcpus >= 1 && m.vcpus <= 254, "{}: {} vCPUs", what, m.vcpus);
    uint64_t covered = 0;
    for (const auto& r : m.regions) {
      require(r.fileOffset == covered && r.size % kPageSize == 0,
              "{}: memory regions do not tile the image", what);
      covered += r.size;
    }
    require(covered == m.memoryBytes && !m.regions.empty(),
            "{}: memory regions cover {} of {} bytes", what, covered, m.memoryBytes);
    return m;
  } catch (const json::exception& e) {
    throw Error(fmt::format("{}: malformed manifest: {}", what, e.what()));
  }
}

namespace {

FileIdentity identityOf(const struct stat& st) {
  auto ns = [](const timespec& t) { return static_cast<int64_t>(t.tv_sec) * 1000000000 + t.tv_nsec; };
  return {static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino),
          static_cast<uint64_t>(st.st_size), ns(st.st_mtim), ns(st.st_ctim)};
}

}  // namespace

void recheckTemplate(const VerifiedTemplate& verified) {
  std::string memoryPath = join(verified.dir, kMemoryFile);
  struct stat st {};
  CLONE_SYSCALL(::stat(memoryPath.c_str(), &st), "stat", memoryPath);
  require(identityOf(st) == verified.memoryFile,
          "{}: changed since the fork server checked it (size {} then, {} now; replaced, written or "
          "truncated): refusing to fork from it", memoryPath, verified.memoryFile.size, st.st_size);
}

VerifiedTemplate verifyTemplate(const std::string& dir) {
  VerifiedTemplate t;
  t.dir = dir;
  std::string manifestPath = join(dir, kManifestFile);
  auto manifestBytes = readWholeFile(manifestPath, 16 << 20);
  t.manifest = manifestFromJson(std::string(manifestBytes.begin(), manifestBytes.end()), manifestPath);
  const Manifest& m = t.manifest;

  std::string statePath = join(dir, kStateFile);
  t.state = readWholeFile(statePath, 64 << 20);
  require(t.state.size() == m.stateSize, "{}: {} bytes, the manifest says {} (corrupted template)",
          statePath, t.state.size(), m.stateSize);
  require(sha256Hex(t.state.data(), t.state.size()) == m.stateSha256,
          "{}: SHA-256 differs from the manifest's (corrupted template)", statePath);

  std::string memoryPath = join(dir, kMemoryFile);
  UniqueFd memory(CLONE_SYSCALL(::open(memoryPath.c_str(), O_RDONLY | O_CLOEXEC), "open", memoryPath));
  struct stat st {};
  CLONE_SYSCALL(::fstat(memory.get(), &st), "stat", memoryPath);
  require(static_cast<uint64_t>(st.st_size) == m.memorySize,
          "{}: {} bytes, the manifest says {} (truncated or corrupted template)", memoryPath,
          st.st_size, m.memorySize);
  t.memoryFile = identityOf(st);
  t.memoryExtents = dataExtents(memory.get(), m.memorySize, memoryPath);
  require(t.memoryExtents.size() == m.memoryExtentCount && sha256Hex(t.memoryExtents) == m.memoryExtentsSha256,
          "{}: its extent map ({} data extents) differs from the manifest's ({}) (modified template)",
          memoryPath, t.memoryExtents.size(), m.memoryExtentCount);
  std::vector<uint8_t> page(kPageSize);
  for (const auto& sample : m.memorySamples) {
    require(sample.offset + kPageSize <= m.memorySize, "{}: sample offset {:#x} out of range",
            manifestPath, sample.offset);
    preadAll(memory.get(), page.data(), page.size(), sample.offset, memoryPath);
    require(sha256Hex(page.data(), page.size()) == sample.sha256,
            "{}: page at {:#x} differs from the manifest's hash (corrupted template)", memoryPath,
            sample.offset);
  }
  for (const auto& disk : m.disks) {
    std::string path = join(dir, disk.file);
    require(!disk.sha256.empty(),
            "{}: disk {} was never copied into the template (the snapshot was taken through the "
            "API, not `clone snapshot`, or did not finish)", manifestPath, disk.file);
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) throwSystemError(errno, "open template disk", path);
    struct stat diskStat {};
    CLONE_SYSCALL(::fstat(fd.get(), &diskStat), "stat", path);
    require(static_cast<uint64_t>(diskStat.st_size) == disk.bytes,
            "{}: {} bytes, the manifest says {} (truncated or corrupted template disk)", path,
            diskStat.st_size, disk.bytes);
    require(templateDiskDigest(fd.get(), disk.bytes, path) == disk.sha256,
            "{}: differs from the manifest's digest (modified or corrupted template disk)", path);
  }
  return t;
}

std::string templateDiskDigest(int fd, uint64_t size, const std::string& path) {
  constexpr uint64_t kEdge = 64 << 10;
  uint64_t head = std::min(size, kEdge);
  uint64_t tailStart = size > kEdge ? std::max(head, size - kEdge) : size;
  std::vector<uint8_t> bytes(8 + head + (size - tailStart));
  std::memcpy(bytes.data(), &size, 8);
  if (head > 0) preadAll(fd, bytes.data() + 8, head, 0, path);
  if (size > tailStart) preadAll(fd, bytes.data() + 8 + head, size - tailStart, tailStart, path);
  // The extent map (a write into a hole or a re-sparsified copy changes it) and pages spread
  // over the data.
  auto extents = dataExtents(fd, size, path);
  std::string map = sha256Hex(extents);
  bytes.insert(bytes.end(), map.begin(), map.end());
  uint64_t dataBytes = 0;
  for (const auto& e : extents) dataBytes += e.length;
  for (uint64_t offset : sampleOffsets(extents, dataBytes)) {
    size_t length = static_cast<size_t>(std::min<uint64_t>(kPageSize, size - offset));
    size_t at = bytes.size();
    bytes.resize(at + length);
    preadAll(fd, bytes.data() + at, length, offset, path);
  }
  return sha256Hex(bytes.data(), bytes.size());
}

void rewriteManifest(const std::string& dir, const Manifest& manifest) {
  std::string json = toJson(manifest);
  std::string temporary = fmt::format("{}.new.{}", kManifestFile, ::getpid());
  ::unlink(join(dir, temporary).c_str());
  writeReadOnlyFile(dir, temporary, json.data(), json.size());
  CLONE_SYSCALL(::rename(join(dir, temporary).c_str(), join(dir, kManifestFile).c_str()),
                "replace", join(dir, kManifestFile));
}

void writeReadOnlyFile(const std::string& dir, const std::string& name, const void* bytes,
                       size_t size) {
  writeReadOnlyFileAt(AT_FDCWD, dir, name, bytes, size);
}

void writeReadOnlyFileAt(int dirFd, const std::string& dirPath, const std::string& name,
                         const void* bytes, size_t size) {
  UniqueFd fd = createTemplateFile(dirFd, dirPath, name, 0444);
  pwriteAll(fd.get(), static_cast<const uint8_t*>(bytes), size, 0, join(dirPath, name));
}


}  // namespace clonevm::vmm::snapshot
