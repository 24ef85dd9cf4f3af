#pragma once
// A template directory (docs/FORK.md): `memory` (sparse image of guest RAM), `state`
// (state_codec.h), `manifest.json`, and later `workingset`. Written once, read-only (0444),
// never written again. This library has no KVM code: the CLI links it to check a template
// before it starts forks.

#include <sys/types.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/unique_fd.h"

namespace clonevm::vmm::snapshot {

inline constexpr uint32_t kTemplateVersion = 1;
inline constexpr uint64_t kPageSize = 4096;
inline constexpr const char* kMemoryFile = "memory";
inline constexpr const char* kStateFile = "state";
inline constexpr const char* kManifestFile = "manifest.json";
inline constexpr const char* kWorkingSetFile = "workingset";

struct Extent {
  uint64_t offset;
  uint64_t length;
  bool operator==(const Extent&) const = default;
};

struct RegionLayout {
  uint64_t guestAddress;
  uint64_t size;
  uint64_t fileOffset;
};

struct CpuidLeaf {
  uint32_t function, index, flags, eax, ebx, ecx, edx;
};

struct PageSample {
  uint64_t offset;
  std::string sha256;
};

// The manifest's name for the vsock device (a fork gets one, with a fresh CID).
inline constexpr char kVsockDeviceName[] = "virtio-vsock (vhost-vsock)";

// What disk N's clone-block answers GET_ID with (`--serial`). A fork's must be the template's,
// whose guest read it: every starter of a disk's process uses this.
inline std::string blockDiskSerial(size_t index) { return "clone-disk" + std::to_string(index); }

// A disk of the template's VM (a vhost-user-blk device served by clone-block), frozen as a
// sparse raw file in the template directory. The core writes the entry (without sha256) when
// it takes the snapshot; `clone snapshot` copies the image while the VM stays paused and then
// fills in sha256. A fork serves a qcow2 overlay over the file (or the file itself, read-only).
struct TemplateDisk {
  std::string file;          // in the template directory: "disk0.raw"
  std::string source;        // the image the VM was served (informational)
  std::string sourceFormat;  // raw|qcow2|auto
  uint64_t bytes = 0;        // the device's capacity, which is the file's size
  bool readOnly = false;     // the device offered VIRTIO_BLK_F_RO
  uint16_t queues = 1;
  // templateDiskDigest() of the file; empty: not copied (an unfinished snapshot).
  std::string sha256;
};

struct Manifest {
  uint32_t version = kTemplateVersion;
  std::string createdUtc;
  // Machine.
  uint64_t memoryBytes = 0;
  std::vector<RegionLayout> regions;
  uint32_t vcpus = 0;
  std::string kernel;
  std::string initrd;
  std::string cmdline;
  // The devices the template's VM had, by name; a fork builds the same ones.
  std::vector<std::string> devices;
  bool hasDevice(const std::string& name) const {
    return std::find(devices.begin(), devices.end(), name) != devices.end();
  }
  std::vector<CpuidLeaf> cpuid;  // vCPU 0's (the others differ only in APIC ids)
  // Files.
  uint64_t stateSize = 0;
  std::string stateSha256;
  uint64_t memorySize = 0;
  uint64_t memoryDataBytes = 0;   // bytes in data extents
  uint64_t memoryExtentCount = 0;
  std::string memoryExtentsSha256;
  std::vector<PageSample> memorySamples;
  // In PCI slot order (the vhost-user-blk devices come first).
  std::vector<TemplateDisk> disks;
};

// "2026-11-23T05:00:00Z".
std::string currentUtcTime();

std::string toJson(const Manifest& manifest);
// Throws clonevm::Error naming `what` on malformed JSON, a wrong format or version.
Manifest manifestFromJson(const std::string& text, const std::string& what);

std::string sha256Hex(const void* data, size_t size);
std::string sha256Hex(const std::vector<Extent>& extents);

// The data extents of an open file (SEEK_DATA/SEEK_HOLE).
std::vector<Extent> dataExtents(int fd, uint64_t size, const std::string& path);

// Creates dirFd/name (O_EXCL, open read-write) with `mode`: dirFd is an open directory (a
// snapshot's output, passed to a jailed core as an fd), or AT_FDCWD to create dirPath/name.
// dirPath names the file in errors either way.
UniqueFd createTemplateFile(int dirFd, const std::string& dirPath, const std::string& name,
                            mode_t mode);

// Copies guest RAM from `memoryFd` (size bytes) into `out`, a new empty file (`path` names it
// in errors), writing only pages that are not all zero, so the zero pages stay holes. Returns
// the file's extent map. The file is left 0444. With `mapping` (a fork's RAM: a lazily filled
// memfd, which still has holes where the template has data, or a copy-on-write mapping of the
// template), every page is read through the mapping, so that unfilled pages fault in from
// the template first; memoryFd is then unused.
std::vector<Extent> writeSparseMemoryImage(int memoryFd, uint64_t size, int out,
                                           const std::string& path,
                                           const uint8_t* mapping = nullptr);

// The memory checks of a manifest: samples and extent digest of an open image.
void describeMemoryImage(int fd, uint64_t size, const std::vector<Extent>& extents,
                         Manifest& manifest, const std::string& path);

// A cheap fingerprint of a template disk file: SHA-256 over its size, its first and last
// 64 KiB (partition table, superblocks, the end a truncation cuts), its extent map
// (SEEK_DATA/SEEK_HOLE) and 32 pages spread over its data. Not a full hash: a fork must not
// read the whole disk to start, so a change confined to unsampled data pages goes unseen.
std::string templateDiskDigest(int fd, uint64_t size, const std::string& path);

// Replaces dir/manifest.json with `manifest` (a new 0444 file renamed over the old one).
void rewriteManifest(const std::string& dir, const Manifest& manifest);

// A template read back and checked: the manifest parsed, the state file's hash and the
// memory image's size, extent map and sample pages match, and each disk file exists with the
// manifest's size and digest. Throws clonevm::Error with a clear
// message otherwise (corrupted, truncated, wrong version).
// Which file, and which version of it: any write, truncation, chmod or replacement changes
// one of these (ctime moves with every change of the inode).
struct FileIdentity {
  uint64_t device = 0, inode = 0, size = 0;
  int64_t mtimeNs = 0, ctimeNs = 0;
  bool operator==(const FileIdentity&) const = default;
};

struct VerifiedTemplate {
  std::string dir;
  Manifest manifest;
  FileIdentity memoryFile;  // the memory file as verified (a fork opens it again by path)
  std::vector<uint8_t> state;  // the state file's bytes
  std::vector<Extent> memoryExtents;
  // memoryExtents as (offset, length) pairs, the form the memory code takes.
  std::vector<std::pair<uint64_t, uint64_t>> memoryExtentPairs() const {
    std::vector<std::pair<uint64_t, uint64_t>> pairs;
    for (const auto& e : memoryExtents) pairs.emplace_back(e.offset, e.length);
    return pairs;
  }
};
VerifiedTemplate verifyTemplate(const std::string& dir);
// For a fork server's fork, which restores long after its server verified the template: the
// cheap part of the check, again. Throws unless the memory file is still the one verified
// (the state and the manifest were read into `verified` then).
void recheckTemplate(const VerifiedTemplate& verified);

// Writes `bytes` to dir/name as a new 0444 file (fails if it exists).
void writeReadOnlyFile(const std::string& dir, const std::string& name, const void* bytes,
                       size_t size);
// The same in an open directory (createTemplateFile).
void writeReadOnlyFileAt(int dirFd, const std::string& dirPath, const std::string& name,
                         const void* bytes, size_t size);

}  // namespace clonevm::vmm::snapshot
