#include "dev-block/image/qcow2_refcounts.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <unistd.h>

#include <algorithm>

#include "common/error.h"
#include "dev-block/image/image_io.h"
#include "dev-block/image/qcow2_header.h"

namespace clonevm::block {

namespace {
constexpr uint64_t kTableOffsetMask = 0xfffffffffffffe00ull;
// The file grows in steps so that allocating cluster after cluster does not truncate each time.
constexpr uint64_t kFileGrowthStep = 1ull << 20;
}  // namespace

Qcow2Refcounts::Qcow2Refcounts(int fd, std::string path, uint32_t clusterBits,
                               uint32_t refcountOrder, uint64_t tableOffset,
                               uint32_t tableClusters, uint64_t fileSize)
    : fd_(fd),
      path_(std::move(path)),
      clusterBits_(clusterBits),
      clusterSize_(1ull << clusterBits),
      refcountOrder_(refcountOrder),
      entriesPerBlock_((clusterSize_ * 8) >> refcountOrder),
      maxRefcount_(refcountOrder == 6 ? ~0ull : (1ull << (1u << refcountOrder)) - 1),
      tableOffset_(tableOffset),
      tableClusters_(tableClusters),
      fileSize_(fileSize),
      dataEnd_(fileSize) {}

void Qcow2Refcounts::load() {
  std::vector<uint8_t> raw(uint64_t{tableClusters_} * clusterSize_);
  preadFull(fd_, raw.data(), raw.size(), tableOffset_, path_);
  table_.resize(raw.size() / 8);
  for (size_t i = 0; i < table_.size(); ++i) {
    uint64_t entry = loadBe64(&raw[i * 8]);
    require((entry & ~kTableOffsetMask) == 0 && entry % clusterSize_ == 0,
            "qcow2 {}: refcount table entry {} (0x{:x}) is not a cluster-aligned offset", path_, i,
            entry);
    require(entry < fileSize_, "qcow2 {}: refcount block {} at 0x{:x} is outside the file", path_,
            i, entry);
    require(entry == 0 || entry >= clusterSize_,
            "qcow2 {}: refcount block {} overlaps the header", path_, i);
    table_[i] = entry;
    if (entry) blockClusters_.insert(entry >> clusterBits_);
  }
}

bool Qcow2Refcounts::isRefcountMetadata(uint64_t clusterIndex) const {
  uint64_t tableFirst = tableOffset_ >> clusterBits_;
  if (clusterIndex >= tableFirst && clusterIndex < tableFirst + tableClusters_) return true;
  return blockClusters_.contains(clusterIndex);
}

bool Qcow2Refcounts::hasBlock(uint64_t blockIndex) const {
  return blockIndex < table_.size() && table_[blockIndex] != 0;
}

std::vector<uint8_t>& Qcow2Refcounts::block(uint64_t blockIndex) {
  auto it = blocks_.find(blockIndex);
  if (it != blocks_.end()) return it->second;
  std::vector<uint8_t> data(clusterSize_);
  preadFull(fd_, data.data(), data.size(), table_[blockIndex], path_);
  return blocks_.emplace(blockIndex, std::move(data)).first->second;
}

uint64_t Qcow2Refcounts::readEntry(const std::vector<uint8_t>& data, uint64_t index) const {
  switch (refcountOrder_) {
    case 0: case 1: case 2: {
      uint32_t bits = 1u << refcountOrder_;
      uint64_t bit = index * bits;
      return (data[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
    }
    case 3: return data[index];
    case 4: return loadBe16(&data[index * 2]);
    case 5: return loadBe32(&data[index * 4]);
    default: return loadBe64(&data[index * 8]);
  }
}

std::pair<uint64_t, uint64_t> Qcow2Refcounts::writeEntry(std::vector<uint8_t>& data,
                                                         uint64_t index, uint64_t value) const {
  switch (refcountOrder_) {
    case 0: case 1: case 2: {
      uint32_t bits = 1u << refcountOrder_;
      uint64_t bit = index * bits;
      uint8_t mask = static_cast<uint8_t>(((1u << bits) - 1) << (bit % 8));
      data[bit / 8] = static_cast<uint8_t>((data[bit / 8] & ~mask) | ((value << (bit % 8)) & mask));
      return {bit / 8, 1};
    }
    case 3: data[index] = static_cast<uint8_t>(value); return {index, 1};
    case 4: storeBe16(&data[index * 2], static_cast<uint16_t>(value)); return {index * 2, 2};
    case 5: storeBe32(&data[index * 4], static_cast<uint32_t>(value)); return {index * 4, 4};
    default: storeBe64(&data[index * 8], value); return {index * 8, 8};
  }
}

uint64_t Qcow2Refcounts::refcount(uint64_t clusterIndex) {
  uint64_t blockIndex = clusterIndex / entriesPerBlock_;
  if (!hasBlock(blockIndex)) return 0;
  return readEntry(block(blockIndex), clusterIndex % entriesPerBlock_);
}

void Qcow2Refcounts::setRefcount(uint64_t clusterIndex, uint64_t value) {
  uint64_t blockIndex = clusterIndex / entriesPerBlock_;
  require(hasBlock(blockIndex), "qcow2 {}: no refcount block for cluster {}", path_, clusterIndex);
  std::vector<uint8_t>& data = block(blockIndex);
  auto [first, count] = writeEntry(data, clusterIndex % entriesPerBlock_, value);
  pwriteFull(fd_, &data[first], count, table_[blockIndex] + first, path_);
}

void Qcow2Refcounts::update(uint64_t clusterIndex, int64_t delta) {
  uint64_t current = refcount(clusterIndex);
  if (delta > 0) {
    require(maxRefcount_ - current >= static_cast<uint64_t>(delta),
            "qcow2 {}: refcount of cluster {} would overflow ({} + {} > {})", path_, clusterIndex,
            current, delta, maxRefcount_);
  } else {
    require(current >= static_cast<uint64_t>(-delta),
            "qcow2 {}: refcount of cluster {} would drop below zero (corrupt image)", path_,
            clusterIndex);
  }
  setRefcount(clusterIndex, current + static_cast<uint64_t>(delta));
}

void Qcow2Refcounts::extendFile(uint64_t end) {
  dataEnd_ = std::max(dataEnd_, end);
  if (end <= fileSize_) return;
  uint64_t step = std::max(kFileGrowthStep, clusterSize_);
  uint64_t newSize = (end + step - 1) / step * step;
  CLONE_SYSCALL(::ftruncate(fd_, static_cast<off_t>(newSize)), "grow image", path_);
  fileSize_ = newSize;
}

Qcow2Refcounts::Allocation Qcow2Refcounts::allocate() {
  for (;;) {
    uint64_t index = freeHint_;
    // Skip used clusters; a missing refcount block means its whole range is free.
    while (true) {
      uint64_t blockIndex = index / entriesPerBlock_;
      if (!hasBlock(blockIndex)) break;
      const std::vector<uint8_t>& data = block(blockIndex);
      uint64_t end = (blockIndex + 1) * entriesPerBlock_;
      while (index < end && readEntry(data, index % entriesPerBlock_) != 0) ++index;
      if (index < end) break;
    }
    freeHint_ = index;
    uint64_t blockIndex = index / entriesPerBlock_;
    if (!hasBlock(blockIndex)) {
      if (blockIndex >= table_.size()) {
        growTable(blockIndex + 1);
        continue;  // the new table and blocks took clusters: search again
      }
      // The new refcount block describes itself: put it at the free cluster it covers.
      uint64_t offset = index << clusterBits_;
      extendFile(offset + clusterSize_);
      std::vector<uint8_t> data(clusterSize_, 0);
      writeEntry(data, index % entriesPerBlock_, 1);
      pwriteFull(fd_, data.data(), data.size(), offset, path_);
      uint8_t entry[8];
      storeBe64(entry, offset);
      pwriteFull(fd_, entry, 8, tableOffset_ + blockIndex * 8, path_);
      table_[blockIndex] = offset;
      blocks_[blockIndex] = std::move(data);
      blockClusters_.insert(index);
      continue;
    }
    uint64_t offset = index << clusterBits_;
    bool readsZero = offset >= dataEnd_;
    setRefcount(index, 1);
    extendFile(offset + clusterSize_);
    freeHint_ = index + 1;
    return {offset, readsZero};
  }
}

void Qcow2Refcounts::release(uint64_t clusterIndex) {
  update(clusterIndex, -1);
  if (refcount(clusterIndex) == 0) {
    int rc;
    do {
      rc = ::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                       static_cast<off_t>(clusterIndex << clusterBits_),
                       static_cast<off_t>(clusterSize_));
    } while (rc < 0 && errno == EINTR);
    if (rc < 0 && errno != EOPNOTSUPP) throwSystemError(errno, "punch freed cluster", path_);
    freeHint_ = std::min(freeHint_, clusterIndex);
  }
}

// Moves the refcount table to the end of the file with room for `neededBlocks` entries (and
// more, to grow geometrically). The new table and any refcount blocks its own clusters need are
// placed together at the end, their refcounts set in the new blocks, and only then does the
// header point at the new table.
void Qcow2Refcounts::growTable(uint64_t neededBlocks) {
  const uint64_t entriesPerCluster = clusterSize_ / 8;
  const uint64_t start = (dataEnd_ + clusterSize_ - 1) >> clusterBits_;
  uint64_t entries = std::max<uint64_t>(neededBlocks, table_.size() * 2);
  uint64_t tableClusters = 0;
  std::vector<uint64_t> newBlocks;  // block indices created for the new region
  for (;;) {
    tableClusters = (entries + entriesPerCluster - 1) / entriesPerCluster;
    uint64_t extra = 0;
    for (;;) {
      newBlocks.clear();
      uint64_t end = start + tableClusters + extra;
      for (uint64_t b = start / entriesPerBlock_; b <= (end - 1) / entriesPerBlock_; ++b) {
        if (!hasBlock(b)) newBlocks.push_back(b);
      }
      if (newBlocks.size() <= extra) break;
      extra = newBlocks.size();
    }
    uint64_t lastBlock = newBlocks.empty() ? 0 : newBlocks.back();
    if (lastBlock < entries) break;
    entries = lastBlock + 1;
  }
  const uint64_t regionEnd = start + tableClusters + newBlocks.size();
  require(tableClusters * clusterSize_ <= kQcow2MaxRefcountTableBytes,
          "qcow2 {}: refcount table would exceed {} bytes", path_, kQcow2MaxRefcountTableBytes);
  extendFile(regionEnd << clusterBits_);

  std::vector<uint64_t> newTable(tableClusters * entriesPerCluster, 0);
  std::copy(table_.begin(), table_.end(), newTable.begin());
  std::unordered_map<uint64_t, std::vector<uint8_t>> created;
  for (size_t i = 0; i < newBlocks.size(); ++i) {
    newTable[newBlocks[i]] = (start + tableClusters + i) << clusterBits_;
    created[newBlocks[i]] = std::vector<uint8_t>(clusterSize_, 0);
  }
  // Refcounts of the region: in the new blocks (written below) or in existing blocks (now).
  for (uint64_t c = start; c < regionEnd; ++c) {
    uint64_t b = c / entriesPerBlock_;
    auto it = created.find(b);
    if (it != created.end()) {
      writeEntry(it->second, c % entriesPerBlock_, 1);
    } else {
      setRefcount(c, 1);
    }
  }
  for (auto& [b, data] : created) pwriteFull(fd_, data.data(), data.size(), newTable[b], path_);
  std::vector<uint8_t> raw(newTable.size() * 8);
  for (size_t i = 0; i < newTable.size(); ++i) storeBe64(&raw[i * 8], newTable[i]);
  pwriteFull(fd_, raw.data(), raw.size(), start << clusterBits_, path_);

  uint8_t field[12];
  storeBe64(field, start << clusterBits_);
  storeBe32(field + 8, static_cast<uint32_t>(tableClusters));
  pwriteFull(fd_, field, sizeof field, kQcow2RefcountTableOffsetField, path_);

  const uint64_t oldFirst = tableOffset_ >> clusterBits_;
  const uint32_t oldClusters = tableClusters_;
  table_ = std::move(newTable);
  tableOffset_ = start << clusterBits_;
  tableClusters_ = static_cast<uint32_t>(tableClusters);
  for (auto& [b, data] : created) {
    blockClusters_.insert(table_[b] >> clusterBits_);
    blocks_[b] = std::move(data);
  }
  for (uint64_t c = oldFirst; c < oldFirst + oldClusters; ++c) release(c);
}

}  // namespace clonevm::block
