#include "dev-block/image/qcow2_image.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>

#include "common/error.h"
#include "dev-block/image/image_io.h"
#include "dev-block/image/qcow2_compression.h"

namespace clonevm::block {

namespace {

constexpr uint64_t kCopied = 1ull << 63;
constexpr uint64_t kCompressed = 1ull << 62;
constexpr uint64_t kZeroFlag = 1ull << 0;
constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;
constexpr uint64_t kL1ReservedMask = 0x7f000000000001feull;
constexpr uint64_t kL2ReservedMask = 0x3f000000000001feull;
// In the cache, an entry refused at load time becomes this word (reserved bits set).
constexpr uint64_t kBadWord = 0x2;
constexpr uint64_t kL2CacheBytes = 32ull << 20;

uint32_t subclusterMask(uint32_t first, uint32_t last) {
  uint64_t bits = ((2ull << last) - 1) & ~((1ull << first) - 1);
  return static_cast<uint32_t>(bits);
}

}  // namespace

std::unique_ptr<Qcow2Image> Qcow2Image::open(const std::string& path, bool readOnly,
                                             const BackingOpener& openBacking) {
  UniqueFd fd(CLONE_SYSCALL(::open(path.c_str(), (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC),
                            "open qcow2 image", path));
  uint64_t fileSize = fileSizeOf(fd.get(), path);
  std::vector<uint8_t> first(512);
  preadFull(fd.get(), first.data(), first.size(), 0, path);
  uint32_t clusterBits = loadBe32(&first[20]);
  if (clusterBits > 9 && clusterBits <= kQcow2MaxClusterBits) {
    first.resize(1ull << clusterBits);
    preadFull(fd.get(), first.data(), first.size(), 0, path);
  }
  Qcow2Header header = Qcow2Header::parse(first, path);
  header.validateLayout(fileSize, path);
  if (!readOnly) {
    require(!(header.incompatibleFeatures & kQcow2IncompatDirty),
            "qcow2 {}: the image is dirty (lazy refcounts, not closed cleanly); its refcounts "
            "must be rebuilt first: run `qemu-img check -r all {}`",
            path, path);
    require(!(header.incompatibleFeatures & kQcow2IncompatCorrupt),
            "qcow2 {}: the image is marked corrupt; repair it with `qemu-img check -r all {}`",
            path, path);
    require(header.nbSnapshots == 0,
            "qcow2 {}: images with internal snapshots ({}) can only be opened read-only", path,
            header.nbSnapshots);
  }
  std::unique_ptr<Qcow2Image> image(
      new Qcow2Image(std::move(fd), path, readOnly, std::move(header), fileSize));
  image->refcounts_->load();
  image->loadL1();
  if (!image->header_.backingFile.empty()) {
    const std::string& name = image->header_.backingFile;
    require(!name.starts_with("json:"), "qcow2 {}: backing file '{}' (json:) is not supported",
            path, name);
    std::string resolved = name;
    if (!name.starts_with("/")) {
      auto slash = path.rfind('/');
      resolved = slash == std::string::npos ? name : path.substr(0, slash + 1) + name;
    }
    image->backingPath_ = resolved;
    image->backing_ = openBacking(resolved, image->header_.backingFormat());
  }
  if (!readOnly && image->header_.autoclearFeatures != 0) {
    // We keep no bitmaps up to date: clearing the bits tells QEMU they are stale.
    uint8_t zero[8] = {};
    pwriteFull(image->fd_.get(), zero, 8, kQcow2AutoclearFeaturesField, path);
    image->header_.autoclearFeatures = 0;
  }
  return image;
}

Qcow2Image::Qcow2Image(UniqueFd fd, std::string path, bool readOnly, Qcow2Header header,
                       uint64_t fileSize)
    : fd_(std::move(fd)),
      path_(std::move(path)),
      readOnly_(readOnly),
      header_(std::move(header)),
      clusterBits_(header_.clusterBits),
      clusterSize_(header_.clusterSize()),
      l2Bits_(clusterBits_ - (header_.extendedL2() ? 4 : 3)),
      extended_(header_.extendedL2()),
      subclusterBits_(extended_ ? clusterBits_ - 5 : clusterBits_),
      fullMask_(extended_ ? 0xffffffffu : 1u) {
  refcounts_ = std::make_unique<Qcow2Refcounts>(fd_.get(), path_, clusterBits_,
                                                header_.refcountOrder, header_.refcountTableOffset,
                                                header_.refcountTableClusters, fileSize);
  l2CacheCapacity_ = std::max<size_t>(16, kL2CacheBytes / clusterSize_);
}

Qcow2Image::~Qcow2Image() {
  if (readOnly_) return;
  try {
    CLONE_SYSCALL(::fdatasync(fd_.get()), "flush qcow2 image", path_);
    if (dirty_) {
      uint8_t field[8];
      storeBe64(field, header_.incompatibleFeatures & ~kQcow2IncompatDirty);
      pwriteFull(fd_.get(), field, 8, kQcow2IncompatibleFeaturesField, path_);
      CLONE_SYSCALL(::fdatasync(fd_.get()), "flush qcow2 image", path_);
    }
  } catch (const Error&) {
    // A failed clean close leaves the dirty bit set: the next open asks for a repair.
  }
}

std::string Qcow2Image::describe() const {
  std::string text = fmt::format("qcow2 v{}, {} KiB clusters", header_.version, clusterSize_ / 1024);
  if (clusterSize_ < 1024) text = fmt::format("qcow2 v{}, {} B clusters", header_.version, clusterSize_);
  if (extended_) text += ", subclusters";
  if (backing_) text += fmt::format(", backing ({})", backing_->describe());
  return text;
}

void Qcow2Image::loadL1() {
  std::vector<uint8_t> raw(uint64_t{header_.l1Size} * 8);
  preadFull(fd_.get(), raw.data(), raw.size(), header_.l1TableOffset, path_);
  l1_.resize(header_.l1Size);
  const uint64_t fileSize = refcounts_->fileSize();
  for (size_t i = 0; i < l1_.size(); ++i) {
    uint64_t entry = loadBe64(&raw[i * 8]);
    uint64_t offset = entry & kOffsetMask;
    std::string why;
    if (entry & kL1ReservedMask) {
      why = "reserved bits set";
    } else if (offset % clusterSize_ != 0) {
      why = "L2 table offset is not cluster-aligned";
    } else if (offset != 0 && offset >= fileSize) {
      why = "L2 table is outside the file";
    } else if (offset != 0 && (offset < clusterSize_ ||
                               refcounts_->isRefcountMetadata(offset >> clusterBits_) ||
                               (offset >= header_.l1TableOffset &&
                                offset < header_.l1TableOffset + raw.size()))) {
      why = "L2 table overlaps other metadata";
    }
    if (!why.empty()) {
      badL1_[i] = fmt::format("0x{:x}: {}", entry, why);
      l1_[i] = kBadWord;
      continue;
    }
    l1_[i] = entry;
    if (offset) l2Clusters_.insert(offset >> clusterBits_);
  }
}

bool Qcow2Image::isMetadataCluster(uint64_t index) const {
  if (index == 0) return true;
  uint64_t l1First = header_.l1TableOffset >> clusterBits_;
  uint64_t l1Clusters = (uint64_t{header_.l1Size} * 8 + clusterSize_ - 1) >> clusterBits_;
  if (index >= l1First && index < l1First + l1Clusters) return true;
  if (header_.nbSnapshots && index == header_.snapshotsOffset >> clusterBits_) return true;
  return refcounts_->isRefcountMetadata(index) || l2Clusters_.contains(index);
}

std::string Qcow2Image::checkDataEntry(uint64_t word, uint64_t bitmap) const {
  if (word & kCompressed) {
    uint64_t offset, length;
    compressedRange(word, offset, length);
    if (offset >= refcounts_->fileSize()) return "compressed data is outside the file";
    if (offset < clusterSize_) return "compressed data overlaps the header";
    return {};
  }
  if (word & kL2ReservedMask) return "reserved bits set";
  uint64_t host = word & kOffsetMask;
  uint32_t alloc = static_cast<uint32_t>(bitmap);
  uint32_t zero = static_cast<uint32_t>(bitmap >> 32);
  if (extended_ && (alloc & zero)) return "subcluster both allocated and zero";
  if (extended_ && !host && alloc) return "subclusters allocated without a host cluster";
  if (!host) return {};
  if (host % clusterSize_) return "host offset is not cluster-aligned";
  if (host >= refcounts_->fileSize()) return "host cluster is outside the file";
  if (isMetadataCluster(host >> clusterBits_)) return "host cluster overlaps image metadata";
  return {};
}

Qcow2Image::L2Table* Qcow2Image::cacheL2(uint64_t offset, std::vector<uint64_t> words) {
  if (l2Cache_.size() >= l2CacheCapacity_) {
    uint64_t victim = l2Lru_.back();
    l2Lru_.pop_back();
    l2Cache_.erase(victim);
  }
  l2Lru_.push_front(offset);
  L2Table& table = l2Cache_[offset];
  table.offset = offset;
  table.words = std::move(words);
  table.lru = l2Lru_.begin();
  lastL1Index_ = ~0ull;  // the map may have rehashed
  lastL2_ = nullptr;
  return &table;
}

Qcow2Image::L2Table* Qcow2Image::loadL2(uint64_t l1Index, uint64_t offset) {
  std::vector<uint8_t> raw(clusterSize_);
  preadFull(fd_.get(), raw.data(), raw.size(), offset, path_);
  const uint64_t entries = 1ull << l2Bits_;
  const uint32_t wordsPerEntry = extended_ ? 2 : 1;
  std::vector<uint64_t> words(entries * wordsPerEntry);
  for (uint64_t i = 0; i < entries; ++i) {
    uint64_t word = loadBe64(&raw[i * 8 * wordsPerEntry]);
    uint64_t bitmap = extended_ ? loadBe64(&raw[i * 16 + 8]) : 0;
    std::string why = checkDataEntry(word, bitmap);
    if (!why.empty()) {
      badL2_[(l1Index << l2Bits_) + i] = fmt::format("0x{:x}: {}", word, why);
      word = kBadWord;
      bitmap = 0;
    }
    words[i * wordsPerEntry] = word;
    if (extended_) words[i * 2 + 1] = bitmap;
  }
  return cacheL2(offset, std::move(words));
}

Qcow2Image::L2Table* Qcow2Image::l2ForRead(uint64_t l1Index) {
  if (l1Index == lastL1Index_) return lastL2_;
  uint64_t entry = l1_[l1Index];
  if (entry == kBadWord) {
    throw Error(fmt::format("qcow2 {}: L1 entry {} is invalid ({})", path_, l1Index, badL1_[l1Index]));
  }
  uint64_t offset = entry & kOffsetMask;
  if (offset == 0) return nullptr;
  L2Table* table;
  auto it = l2Cache_.find(offset);
  if (it != l2Cache_.end()) {
    table = &it->second;
    l2Lru_.splice(l2Lru_.begin(), l2Lru_, table->lru);
  } else {
    table = loadL2(l1Index, offset);
  }
  lastL1Index_ = l1Index;
  lastL2_ = table;
  return table;
}

Qcow2Image::L2Table* Qcow2Image::l2ForWrite(uint64_t l1Index) {
  if (L2Table* table = l2ForRead(l1Index)) return table;
  markDirty();
  auto allocation = allocateCluster();
  if (!allocation.readsZero) writeZeroBytes(fd_.get(), allocation.offset, clusterSize_, path_);
  l2Clusters_.insert(allocation.offset >> clusterBits_);
  uint8_t field[8];
  storeBe64(field, allocation.offset | kCopied);
  pwriteFull(fd_.get(), field, 8, header_.l1TableOffset + l1Index * 8, path_);
  l1_[l1Index] = allocation.offset | kCopied;
  L2Table* table = cacheL2(allocation.offset,
                           std::vector<uint64_t>((1ull << l2Bits_) * (extended_ ? 2 : 1), 0));
  lastL1Index_ = l1Index;
  lastL2_ = table;
  return table;
}

Qcow2Image::Mapping Qcow2Image::decode(const L2Table* table, uint64_t guestCluster) const {
  Mapping m;
  if (!table) return m;
  uint64_t index = guestCluster & ((1ull << l2Bits_) - 1);
  m.word = table->words[extended_ ? index * 2 : index];
  if (m.word & kCompressed) {
    m.compressed = true;
    return m;
  }
  if (m.word & kL2ReservedMask) {
    auto it = badL2_.find(guestCluster);
    throw Error(fmt::format("qcow2 {}: L2 entry for guest offset 0x{:x} is invalid ({})", path_,
                            guestCluster << clusterBits_,
                            it == badL2_.end() ? "reserved bits set" : it->second));
  }
  m.host = m.word & kOffsetMask;
  if (extended_) {
    uint64_t bitmap = table->words[index * 2 + 1];
    m.alloc = static_cast<uint32_t>(bitmap);
    m.zero = static_cast<uint32_t>(bitmap >> 32);
  } else if (m.word & kZeroFlag) {
    m.zero = 1;
  } else if (m.host) {
    m.alloc = 1;
  }
  return m;
}

void Qcow2Image::storeL2(L2Table* table, uint64_t guestCluster, uint64_t word, uint64_t bitmap) {
  uint64_t index = guestCluster & ((1ull << l2Bits_) - 1);
  uint8_t raw[16];
  storeBe64(raw, word);
  if (extended_) {
    storeBe64(raw + 8, bitmap);
    table->words[index * 2] = word;
    table->words[index * 2 + 1] = bitmap;
    pwriteFull(fd_.get(), raw, 16, table->offset + index * 16, path_);
  } else {
    table->words[index] = word;
    pwriteFull(fd_.get(), raw, 8, table->offset + index * 8, path_);
  }
}

void Qcow2Image::readBacking(uint64_t offset, uint64_t length, std::vector<ImageExtent>& out) {
  uint64_t inside = 0;
  if (backing_ && offset < backing_->virtualSize()) {
    inside = std::min(length, backing_->virtualSize() - offset);
    backing_->mapRead(offset, inside, out);
  }
  appendExtent(out, zeroExtent(length - inside));
}

void Qcow2Image::appendHostExtent(uint64_t host, uint64_t length, std::vector<ImageExtent>& out) {
  // QEMU may leave the last cluster short of the end of the file: the rest reads as zeros.
  const uint64_t fileSize = refcounts_->fileSize();
  if (host + length <= fileSize) [[likely]] {
    appendExtent(out, fileExtent(fd_.get(), host, length));
    return;
  }
  uint64_t inFile = host < fileSize ? fileSize - host : 0;
  appendExtent(out, fileExtent(fd_.get(), host, inFile));
  appendExtent(out, zeroExtent(length - inFile));
}

void Qcow2Image::compressedRange(uint64_t word, uint64_t& offset, uint64_t& length) const {
  const uint32_t offsetBits = 62 - (clusterBits_ - 8);
  offset = word & ((1ull << offsetBits) - 1);
  uint64_t sectors = ((word >> offsetBits) & ((1ull << (clusterBits_ - 8)) - 1)) + 1;
  length = sectors * 512 - (offset & 511);
}

std::shared_ptr<const std::vector<uint8_t>> Qcow2Image::decompressed(uint64_t word) {
  auto it = decompressedCache_.find(word);
  if (it != decompressedCache_.end()) return it->second;
  uint64_t offset, length;
  compressedRange(word, offset, length);
  std::vector<uint8_t> in(length);
  preadFull(fd_.get(), in.data(), length, offset, path_);
  auto out = std::make_shared<std::vector<uint8_t>>(clusterSize_);
  try {
    decompressCluster(header_.compressionType(), in.data(), in.size(), *out);
  } catch (const Error& e) {
    throw Error(fmt::format("qcow2 {}: cluster at 0x{:x}: {}", path_, offset, e.what()));
  }
  if (decompressedCache_.size() >= 64) decompressedCache_.clear();
  decompressedCache_[word] = out;
  return out;
}

void Qcow2Image::mapRead(uint64_t offset, uint64_t length, std::vector<ImageExtent>& out) {
  while (length > 0) {
    const uint64_t guestCluster = offset >> clusterBits_;
    const uint64_t inCluster = offset & (clusterSize_ - 1);
    const uint64_t n = std::min(length, clusterSize_ - inCluster);
    const Mapping m = decode(l2ForRead(guestCluster >> l2Bits_), guestCluster);
    if (m.compressed) {
      ImageExtent e;
      e.kind = ImageExtent::Kind::kBuffer;
      e.length = n;
      e.buffer = decompressed(m.word);
      e.bufferOffset = inCluster;
      appendExtent(out, std::move(e));
    } else if (!extended_) {
      if (m.alloc) {
        appendHostExtent(m.host + inCluster, n, out);
      } else if (m.zero) {
        appendExtent(out, zeroExtent(n));
      } else {
        readBacking(offset, n, out);
      }
    } else {
      uint64_t pos = inCluster;
      while (pos < inCluster + n) {
        uint32_t sub = static_cast<uint32_t>(pos >> subclusterBits_);
        uint64_t end = std::min(inCluster + n, uint64_t{sub + 1} << subclusterBits_);
        uint64_t base = (guestCluster << clusterBits_);
        if (m.alloc & (1u << sub)) {
          appendHostExtent(m.host + pos, end - pos, out);
        } else if (m.zero & (1u << sub)) {
          appendExtent(out, zeroExtent(end - pos));
        } else {
          readBacking(base + pos, end - pos, out);
        }
        pos = end;
      }
    }
    offset += n;
    length -= n;
  }
}

Qcow2Refcounts::Allocation Qcow2Image::allocateCluster() {
  auto allocation = refcounts_->allocate();
  // A corrupt refcount of 0 on a metadata cluster must not turn it into a data cluster.
  require(!isMetadataCluster(allocation.offset >> clusterBits_),
          "qcow2 {}: cluster 0x{:x} holds metadata but its refcount was 0 (corrupt image; run "
          "`qemu-img check -r all {}`)",
          path_, allocation.offset, path_);
  return allocation;
}

void Qcow2Image::requireWritable() const {
  require(!readOnly_, "qcow2 {} is opened read-only", path_);
}

void Qcow2Image::markDirty() {
  if (dirty_ || !(header_.compatibleFeatures & kQcow2CompatLazyRefcounts)) return;
  uint8_t field[8];
  storeBe64(field, header_.incompatibleFeatures | kQcow2IncompatDirty);
  pwriteFull(fd_.get(), field, 8, kQcow2IncompatibleFeaturesField, path_);
  CLONE_SYSCALL(::fdatasync(fd_.get()), "flush qcow2 image", path_);
  dirty_ = true;
}

void Qcow2Image::mapWrite(uint64_t offset, uint64_t length, std::vector<ImageExtent>& out) {
  requireWritable();
  while (length > 0) {
    const uint64_t guestCluster = offset >> clusterBits_;
    const uint64_t inCluster = offset & (clusterSize_ - 1);
    const uint64_t n = std::min(length, clusterSize_ - inCluster);
    L2Table* table = l2ForWrite(guestCluster >> l2Bits_);
    const Mapping m = decode(table, guestCluster);
    const uint32_t touched = subclusterMask(static_cast<uint32_t>(inCluster >> subclusterBits_),
                                            static_cast<uint32_t>((inCluster + n - 1) >> subclusterBits_));
    uint64_t host;
    if (!m.compressed && (m.alloc & touched) == touched) [[likely]] {
      host = m.host + inCluster;
    } else {
      host = prepareWrite(table, guestCluster, m, inCluster, n);
    }
    appendExtent(out, fileExtent(fd_.get(), host, n));
    offset += n;
    length -= n;
  }
}

// Fills part of a newly used subcluster with what it read before: zeros or the backing data.
void Qcow2Image::fillFromBelow(uint64_t guestOffset, uint64_t host, uint64_t length,
                               bool zeroSubcluster, bool readsZero) {
  if (length == 0) return;
  if (zeroSubcluster || !backing_) {
    if (!readsZero) writeZeroBytes(fd_.get(), host, length, path_);
    return;
  }
  std::vector<ImageExtent> below;
  readBacking(guestOffset, length, below);
  copyExtentsTo(below, fd_.get(), host, path_, readsZero);
}

uint64_t Qcow2Image::prepareWrite(L2Table* table, uint64_t guestCluster, const Mapping& m,
                                  uint64_t inCluster, uint64_t length) {
  markDirty();
  const uint64_t guestBase = guestCluster << clusterBits_;
  if (m.compressed) {
    auto data = decompressed(m.word);
    auto allocation = allocateCluster();
    pwriteFull(fd_.get(), data->data(), clusterSize_, allocation.offset, path_);
    storeL2(table, guestCluster, allocation.offset | kCopied, extended_ ? fullMask_ : 0);
    freeCompressed(m.word);
    return allocation.offset + inCluster;
  }
  uint64_t host = m.host;
  bool readsZero = false;
  if (!host) {
    auto allocation = allocateCluster();
    host = allocation.offset;
    readsZero = allocation.readsZero;
  }
  const uint32_t firstSub = static_cast<uint32_t>(inCluster >> subclusterBits_);
  const uint32_t lastSub = static_cast<uint32_t>((inCluster + length - 1) >> subclusterBits_);
  for (uint32_t sub = firstSub; sub <= lastSub; ++sub) {
    if (m.alloc & (1u << sub)) continue;
    const uint64_t subStart = uint64_t{sub} << subclusterBits_;
    const uint64_t subEnd = subStart + (1ull << subclusterBits_);
    const bool zero = m.zero & (1u << sub);
    if (sub == firstSub && inCluster > subStart) {
      fillFromBelow(guestBase + subStart, host + subStart, inCluster - subStart, zero, readsZero);
    }
    if (sub == lastSub && inCluster + length < subEnd) {
      fillFromBelow(guestBase + inCluster + length, host + inCluster + length,
                    subEnd - inCluster - length, zero, readsZero);
    }
  }
  const uint32_t touched = subclusterMask(firstSub, lastSub);
  const uint64_t bitmap =
      (uint64_t{m.zero & ~touched} << 32) | uint64_t{m.alloc | touched};
  storeL2(table, guestCluster, host | kCopied, extended_ ? bitmap : 0);
  return host + inCluster;
}

void Qcow2Image::freeCompressed(uint64_t word) {
  uint64_t offset, length;
  compressedRange(word, offset, length);
  for (uint64_t c = offset >> clusterBits_; c <= (offset + length - 1) >> clusterBits_; ++c) {
    refcounts_->release(c);
  }
}

// Makes one whole guest cluster read as zeros, freeing its host cluster unless asked to keep it.
// Callers make sure the image can express that (v3, or no backing file).
void Qcow2Image::zeroCluster(uint64_t guestCluster, bool keepAllocation) {
  L2Table* table = l2ForRead(guestCluster >> l2Bits_);
  const Mapping m = decode(table, guestCluster);
  const bool readsZero = !m.compressed && !m.alloc && (m.zero == fullMask_ || (!backing_ && !m.zero));
  if (readsZero && (keepAllocation || !m.host)) return;
  if (!table) table = l2ForWrite(guestCluster >> l2Bits_);
  markDirty();
  const bool v3 = header_.version >= 3;
  uint64_t keptHost = (keepAllocation && !m.compressed && v3) ? m.host : 0;
  uint64_t word = keptHost ? (keptHost | kCopied) : 0;
  uint64_t bitmap = 0;
  if (extended_) {
    bitmap = uint64_t{fullMask_} << 32;
  } else if (v3) {
    word |= kZeroFlag;
  }
  storeL2(table, guestCluster, word, bitmap);
  if (m.compressed) {
    freeCompressed(m.word);
  } else if (m.host && !keptHost) {
    refcounts_->release(m.host >> clusterBits_);
  }
}

void Qcow2Image::discard(uint64_t offset, uint64_t length) {
  requireWritable();
  // v2 cannot mark a cluster as zeros: with a backing file, discard would expose its data.
  if (header_.version < 3 && backing_) return;
  uint64_t first = (offset + clusterSize_ - 1) >> clusterBits_;
  uint64_t end = (offset + length) >> clusterBits_;
  for (uint64_t c = first; c < end; ++c) zeroCluster(c, false);
}

void Qcow2Image::writeZeroes(uint64_t offset, uint64_t length, bool mayUnmap) {
  requireWritable();
  const bool wholeClusters = header_.version >= 3 || !backing_;
  uint64_t first = (offset + clusterSize_ - 1) >> clusterBits_;
  uint64_t end = (offset + length) >> clusterBits_;
  if (!wholeClusters || first >= end) {
    first = end = offset >> clusterBits_;  // everything goes the explicit way
  }
  auto explicitZeros = [&](uint64_t from, uint64_t to) {
    if (from >= to) return;
    std::vector<ImageExtent> extents;
    mapWrite(from, to - from, extents);
    for (const auto& e : extents) writeZeroBytes(e.fd, e.fileOffset, e.length, path_);
  };
  if (first == end) {
    explicitZeros(offset, offset + length);
    return;
  }
  explicitZeros(offset, first << clusterBits_);
  for (uint64_t c = first; c < end; ++c) zeroCluster(c, !mayUnmap);
  explicitZeros(end << clusterBits_, offset + length);
}

void Qcow2Image::flush() {
  if (readOnly_) return;
  // Data and metadata share one file: one fdatasync makes both durable.
  CLONE_SYSCALL(::fdatasync(fd_.get()), "flush qcow2 image", path_);
}

}  // namespace clonevm::block
