#include "dev-block/image/qcow2_create.h"

#include <fcntl.h>
#include <unistd.h>

#include <vector>

#include "common/error.h"
#include "common/unique_fd.h"
#include "dev-block/image/image_io.h"
#include "dev-block/image/qcow2_header.h"

namespace clonevm::block {

void createQcow2(const std::string& path, const Qcow2CreateOptions& o) {
  require(o.version == 2 || o.version == 3, "qcow2 version {} cannot be created", o.version);
  require(o.clusterBits >= kQcow2MinClusterBits && o.clusterBits <= kQcow2MaxClusterBits,
          "cluster_bits {} out of range", o.clusterBits);
  require(o.refcountOrder <= 6, "refcount_order {} out of range", o.refcountOrder);
  require(o.version == 3 || (o.refcountOrder == 4 && !o.lazyRefcounts && !o.extendedL2),
          "qcow2 v2 has 16-bit refcounts and no lazy refcounts or extended L2");
  require(!o.extendedL2 || o.clusterBits >= 14, "extended L2 entries need clusters of 16 KiB or more");
  const uint64_t cs = 1ull << o.clusterBits;
  const uint64_t l2Entries = cs / (o.extendedL2 ? 16 : 8);
  const uint64_t l1Coverage = cs * l2Entries;
  const uint64_t l1Size = (o.size + l1Coverage - 1) / l1Coverage;
  require(l1Size * 8 <= kQcow2MaxL1Bytes, "virtual size {} too large for {}-byte clusters", o.size, cs);
  const uint64_t l1Clusters = std::max<uint64_t>(1, (l1Size * 8 + cs - 1) / cs);
  const uint64_t perBlock = (cs * 8) >> o.refcountOrder;

  // Header, refcount table, refcount blocks, L1 table: the blocks must cover all of them.
  uint64_t blocks = 1, tableClusters = 1, total = 0;
  for (;;) {
    total = 1 + tableClusters + blocks + l1Clusters;
    uint64_t needBlocks = (total + perBlock - 1) / perBlock;
    uint64_t needTable = (needBlocks * 8 + cs - 1) / cs;
    if (needBlocks <= blocks && needTable <= tableClusters) break;
    blocks = std::max(blocks, needBlocks);
    tableClusters = std::max(tableClusters, needTable);
  }
  const uint64_t tableAt = 1, blocksAt = 1 + tableClusters, l1At = blocksAt + blocks;

  Qcow2Header h;
  h.version = o.version;
  h.clusterBits = o.clusterBits;
  h.size = o.size;
  h.l1Size = static_cast<uint32_t>(l1Size);
  h.l1TableOffset = l1At * cs;
  h.refcountTableOffset = tableAt * cs;
  h.refcountTableClusters = static_cast<uint32_t>(tableClusters);
  h.refcountOrder = o.refcountOrder;
  h.compatibleFeatures = o.lazyRefcounts ? uint64_t{kQcow2CompatLazyRefcounts} : 0;
  h.incompatibleFeatures = o.extendedL2 ? uint64_t{kQcow2IncompatExtendedL2} : 0;
  h.backingFile = o.backingFile;
  if (!o.backingFile.empty()) h.setBackingFormat(o.backingFormat);
  std::vector<uint8_t> header = h.serialize();

  std::vector<uint8_t> table(tableClusters * cs, 0);
  for (uint64_t b = 0; b < blocks; ++b) storeBe64(&table[b * 8], (blocksAt + b) * cs);
  std::vector<uint8_t> refblocks(blocks * cs, 0);
  const uint32_t bits = 1u << o.refcountOrder;
  for (uint64_t c = 0; c < total; ++c) {
    uint64_t bit = c * bits;  // refcount 1, stored big-endian in its `bits`-wide slot
    if (bits < 8) {
      refblocks[bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
    } else {
      refblocks[(bit + bits) / 8 - 1] = 1;
    }
  }

  UniqueFd fd(CLONE_SYSCALL(::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644),
                            "create qcow2 image", path));
  try {
    CLONE_SYSCALL(::ftruncate(fd.get(), static_cast<off_t>(total * cs)), "size qcow2 image", path);
    pwriteFull(fd.get(), header.data(), header.size(), 0, path);
    pwriteFull(fd.get(), table.data(), table.size(), tableAt * cs, path);
    pwriteFull(fd.get(), refblocks.data(), refblocks.size(), blocksAt * cs, path);
    CLONE_SYSCALL(::fdatasync(fd.get()), "flush qcow2 image", path);
  } catch (...) {
    ::unlink(path.c_str());
    throw;
  }
}

}  // namespace clonevm::block
