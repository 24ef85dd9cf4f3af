#pragma once
// Which images a VM's disks really are, as the CLI that started them knows it. `clone run`
// and `clone fork` write it next to the VM's API socket (BASE.disks, BASE = the socket path
// without ".sock"), where no core's jail reaches. `clone snapshot` copies a disk into the
// template only if the manifest the core wrote names the recorded image: a compromised core
// could otherwise name any file the user can read (~/.ssh/id_rsa) and have it copied into
// the template, and so into every fork's disk.

#include <string>
#include <vector>

#include "vmm-core/snapshot/template_files.h"

namespace clonevm::cli {

struct RecordedDisk {
  std::string image;   // absolute path, as given to clone-vmm's image=
  std::string format;  // raw, qcow2, auto
  // The name the core knows the image by, when that is not `image`: a fork server's fork
  // (spare_disks.h), whose overlay `clone fork` moved out of the server's jail to `image`.
  // The manifest must name this one; the copy reads `image`, the same file.
  std::string coreImage;
};

// A VM's API socket path without ".sock": the stem of the files kept beside it (BASE.disks,
// BASE.diskN.qcow2, BASE.console).
std::string socketFileBase(const std::string& apiSocket);

std::string diskRecordPath(const std::string& apiSocket);

// Writes the record (0600, replacing a stale one: the caller holds the live socket).
void writeDiskRecord(const std::string& apiSocket, const std::vector<RecordedDisk>& disks);

// Reads it; throws clonevm::Error naming the file when it is missing or unreadable.
std::vector<RecordedDisk> readDiskRecord(const std::string& apiSocket);

void removeDiskRecord(const std::string& apiSocket);

// Throws unless every disk of `manifest` names the recorded image (or core image) and format,
// in order.
void requireRecordedDisks(const vmm::snapshot::Manifest& manifest,
                          const std::vector<RecordedDisk>& recorded, const std::string& record);

}  // namespace clonevm::cli
