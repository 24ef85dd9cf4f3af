#pragma once
// The disks of a template (docs/FORK.md): `clone snapshot` copies each disk the core listed in
// the manifest into the template directory as a sparse raw file, while the VM stays paused
// with its disk queues stopped, and fills in the manifest's digests.

#include <cstdint>
#include <string>
#include <vector>

#include "cli/disk_record.h"

namespace clonevm::cli {

// Copies the image at `source` (raw, or qcow2 with its whole backing chain: flattened; opened
// read-only) into a new file `target` (O_EXCL) of exactly `bytes`, the disk's capacity.
// Writes only 4 KiB blocks that hold something, so zeros, holes and unallocated clusters stay
// holes. Leaves the file 0444 and synced. Returns the bytes written. Throws clonevm::Error
// naming the file (another size, a damaged image, an existing target).
uint64_t copyDiskImage(const std::string& source, const std::string& format,
                       const std::string& target, uint64_t bytes);

struct TemplateDiskCopies {
  size_t disks = 0;
  uint64_t dataBytes = 0;  // written into the template
};

// For every disk in dir/manifest.json without a digest: copies its source image to its file
// in `dir` and records the file's digest (templateDiskDigest), then rewrites the manifest.
// The source paths come from the core that wrote the manifest, so nothing is copied unless
// they are the images the VM was started with (`recorded`, from `recordPath`; disk_record.h).
TemplateDiskCopies copyTemplateDisks(const std::string& dir, const std::vector<RecordedDisk>& recorded,
                                     const std::string& recordPath);

}  // namespace clonevm::cli
