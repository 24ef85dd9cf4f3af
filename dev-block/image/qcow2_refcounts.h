#pragma once
// qcow2 reference counts: the refcount table, its refcount blocks (any width, 1 to 64 bits),
// cluster allocation and freeing, and growth of the table.
//
// Every change is written through to the file at once, in an order that keeps the image
// consistent for `qemu-img check` at any point a process may die: a new refcount block is
// written before the table entry pointing at it, a new table before the header points at it,
// and a cluster's refcount is raised before the caller stores any pointer to it.

#include <cstdint>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace clonevm::block {

class Qcow2Refcounts {
 public:
  Qcow2Refcounts(int fd, std::string path, uint32_t clusterBits, uint32_t refcountOrder,
                 uint64_t tableOffset, uint32_t tableClusters, uint64_t fileSize);

  // Reads the refcount table; entries must be cluster-aligned with zero reserved bits.
  void load();

  uint64_t refcount(uint64_t clusterIndex);
  // Adds `delta` to a cluster's refcount; refuses overflow past the refcount width and underflow.
  void update(uint64_t clusterIndex, int64_t delta);

  struct Allocation {
    uint64_t offset;
    bool readsZero;  // the cluster lies past the old end of the file
  };
  // A free cluster, now with refcount 1; the file is extended to hold it.
  Allocation allocate();
  // Frees a cluster whose last reference the caller has already removed (refcount - 1), and
  // punches it out of the file when it drops to 0.
  void release(uint64_t clusterIndex);

  uint64_t fileSize() const { return fileSize_; }
  uint64_t maxRefcount() const { return maxRefcount_; }
  bool isRefcountMetadata(uint64_t clusterIndex) const;

 private:
  std::vector<uint8_t>& block(uint64_t blockIndex);  // loaded on demand; must exist
  bool hasBlock(uint64_t blockIndex) const;
  uint64_t readEntry(const std::vector<uint8_t>& data, uint64_t index) const;
  // Stores the entry in `data` and returns the byte range [first, first+count) that changed.
  std::pair<uint64_t, uint64_t> writeEntry(std::vector<uint8_t>& data, uint64_t index,
                                           uint64_t value) const;
  void setRefcount(uint64_t clusterIndex, uint64_t value);
  void growTable(uint64_t neededBlocks);
  void extendFile(uint64_t end);

  int fd_;
  std::string path_;
  uint32_t clusterBits_;
  uint64_t clusterSize_;
  uint32_t refcountOrder_;
  uint64_t entriesPerBlock_;
  uint64_t maxRefcount_;
  uint64_t tableOffset_;
  uint32_t tableClusters_;
  std::vector<uint64_t> table_;
  std::unordered_map<uint64_t, std::vector<uint8_t>> blocks_;
  std::unordered_set<uint64_t> blockClusters_;
  uint64_t fileSize_;  // the file's size, including room grown ahead of use
  uint64_t dataEnd_;   // past it, no cluster was ever handed out: the file reads zeros
  uint64_t freeHint_ = 0;
};

}  // namespace clonevm::block
