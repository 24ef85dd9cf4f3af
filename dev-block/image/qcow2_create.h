#pragma once
// Creating empty qcow2 images (overlays, and test images of every geometry).

#include <cstdint>
#include <string>

namespace clonevm::block {

struct Qcow2CreateOptions {
  uint64_t size = 0;
  uint32_t version = 3;
  uint32_t clusterBits = 16;
  uint32_t refcountOrder = 4;
  bool lazyRefcounts = false;
  bool extendedL2 = false;
  std::string backingFile;    // stored as given
  std::string backingFormat;  // "raw", "qcow2" or "" (probe)
};

// Creates `path` (which must not exist): header, refcount table and blocks, an empty L1 table.
void createQcow2(const std::string& path, const Qcow2CreateOptions& options);

}  // namespace clonevm::block
