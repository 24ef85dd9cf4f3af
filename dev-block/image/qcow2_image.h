#pragma once
// qcow2 images, versions 2 and 3: L1/L2 mapping with an L2 cache, allocation with copy-on-write
// from the backing chain, zero clusters, compressed clusters (read; rewritten on write),
// extended L2 entries (subclusters), discard and write-zeroes.
//
// Metadata is written through at once, in crash-safe order (a refcount before any pointer to
// its cluster, an L2 table before the L1 entry pointing at it), so a killed process leaves at
// worst leaked clusters. Mapping an allocated cluster touches only memory.

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "common/unique_fd.h"
#include "dev-block/image/block_image.h"
#include "dev-block/image/qcow2_header.h"
#include "dev-block/image/qcow2_refcounts.h"

namespace clonevm::block {

class Qcow2Image final : public BlockImage {
 public:
  // Opens the backing file at `path` (already resolved against the image's directory) with the
  // format from the header ("" when the header does not say), read-only.
  using BackingOpener =
      std::function<std::unique_ptr<BlockImage>(const std::string& path, const std::string& format)>;

  static std::unique_ptr<Qcow2Image> open(const std::string& path, bool readOnly,
                                          const BackingOpener& openBacking);
  ~Qcow2Image() override;

  uint64_t virtualSize() const override { return header_.size; }
  bool readOnly() const override { return readOnly_; }
  uint32_t clusterSize() const override { return static_cast<uint32_t>(clusterSize_); }
  std::string describe() const override;

  void mapRead(uint64_t offset, uint64_t length, std::vector<ImageExtent>& out) override;
  void mapWrite(uint64_t offset, uint64_t length, std::vector<ImageExtent>& out) override;
  void flush() override;
  void discard(uint64_t offset, uint64_t length) override;
  void writeZeroes(uint64_t offset, uint64_t length, bool mayUnmap) override;

  const Qcow2Header& header() const { return header_; }

 private:
  struct L2Table {
    uint64_t offset = 0;
    std::vector<uint64_t> words;  // host byte order; two words an entry with extended L2
    std::list<uint64_t>::iterator lru;
  };
  // One guest cluster's mapping. Standard entries are one subcluster covering the cluster.
  struct Mapping {
    uint64_t word = 0;
    uint64_t host = 0;
    uint32_t alloc = 0;  // subclusters whose data is at host
    uint32_t zero = 0;   // subclusters that read as zeros
    bool compressed = false;
  };

  Qcow2Image(UniqueFd fd, std::string path, bool readOnly, Qcow2Header header, uint64_t fileSize);
  void loadL1();
  L2Table* l2ForRead(uint64_t l1Index);
  L2Table* l2ForWrite(uint64_t l1Index);
  L2Table* loadL2(uint64_t l1Index, uint64_t offset);
  L2Table* cacheL2(uint64_t offset, std::vector<uint64_t> words);
  std::string checkDataEntry(uint64_t word, uint64_t bitmap) const;
  Mapping decode(const L2Table* table, uint64_t guestCluster) const;
  void storeL2(L2Table* table, uint64_t guestCluster, uint64_t word, uint64_t bitmap);
  bool isMetadataCluster(uint64_t clusterIndex) const;
  Qcow2Refcounts::Allocation allocateCluster();

  void readBacking(uint64_t offset, uint64_t length, std::vector<ImageExtent>& out);
  void appendHostExtent(uint64_t host, uint64_t length, std::vector<ImageExtent>& out);
  std::shared_ptr<const std::vector<uint8_t>> decompressed(uint64_t word);
  void compressedRange(uint64_t word, uint64_t& offset, uint64_t& length) const;
  void freeCompressed(uint64_t word);
  uint64_t prepareWrite(L2Table* table, uint64_t guestCluster, const Mapping& m,
                        uint64_t inCluster, uint64_t length);
  void fillFromBelow(uint64_t guestOffset, uint64_t host, uint64_t length, bool zeroSubcluster,
                     bool readsZero);
  void zeroCluster(uint64_t guestCluster, bool keepAllocation);
  void markDirty();
  void requireWritable() const;

  UniqueFd fd_;
  std::string path_;
  bool readOnly_;
  Qcow2Header header_;
  uint32_t clusterBits_;
  uint64_t clusterSize_;
  uint32_t l2Bits_;  // log2 of entries per L2 table
  bool extended_;
  uint32_t subclusterBits_;
  uint32_t fullMask_;  // every subcluster of a cluster
  std::vector<uint64_t> l1_;
  std::unordered_map<uint64_t, std::string> badL1_;
  std::unordered_map<uint64_t, std::string> badL2_;  // guest cluster -> why its entry is refused
  std::unordered_set<uint64_t> l2Clusters_;
  std::unique_ptr<Qcow2Refcounts> refcounts_;

  std::unordered_map<uint64_t, L2Table> l2Cache_;
  std::list<uint64_t> l2Lru_;
  size_t l2CacheCapacity_;
  uint64_t lastL1Index_ = ~0ull;
  L2Table* lastL2_ = nullptr;

  std::unordered_map<uint64_t, std::shared_ptr<const std::vector<uint8_t>>> decompressedCache_;

  std::unique_ptr<BlockImage> backing_;
  std::string backingPath_;
  bool dirty_ = false;
};

}  // namespace clonevm::block
