#include "dev-block/image/qcow2_header.h"

#include <fmt/format.h>

#include "common/error.h"
#include "dev-block/image/image_io.h"

namespace clonevm::block {

std::string Qcow2Header::backingFormat() const {
  for (const auto& ext : extensions) {
    if (ext.type == kQcow2ExtBackingFormat) return std::string(ext.data.begin(), ext.data.end());
  }
  return {};
}

void Qcow2Header::setBackingFormat(const std::string& format) {
  std::erase_if(extensions, [](const auto& e) { return e.type == kQcow2ExtBackingFormat; });
  if (!format.empty()) {
    extensions.insert(extensions.begin(),
                      Qcow2HeaderExtension{kQcow2ExtBackingFormat, {format.begin(), format.end()}});
  }
}

std::string Qcow2Header::featureNames(uint8_t featureType, uint64_t bits) const {
  std::string names;
  for (int bit = 0; bit < 64; ++bit) {
    if (!(bits & (1ull << bit))) continue;
    std::string name;
    for (const auto& ext : extensions) {
      if (ext.type != kQcow2ExtFeatureTable) continue;
      for (size_t i = 0; i + 48 <= ext.data.size(); i += 48) {
        if (ext.data[i] == featureType && ext.data[i + 1] == bit) {
          const char* text = reinterpret_cast<const char*>(&ext.data[i + 2]);
          name.assign(text, strnlen(text, 46));
        }
      }
    }
    if (!names.empty()) names += ", ";
    names += name.empty() ? fmt::format("bit {}", bit) : fmt::format("bit {} ({})", bit, name);
  }
  return names;
}

Qcow2Header Qcow2Header::parse(const std::vector<uint8_t>& data, const std::string& path) {
  require(data.size() >= 512, "qcow2 {}: file too short for a header", path);
  const uint8_t* p = data.data();
  require(loadBe32(p) == kQcow2Magic, "{} is not a qcow2 image (bad magic)", path);
  Qcow2Header h;
  h.version = loadBe32(p + 4);
  require(h.version == 2 || h.version == 3, "qcow2 {}: version {} is not supported (only 2 and 3)",
          path, h.version);
  h.backingFileOffset = loadBe64(p + 8);
  h.backingFileSize = loadBe32(p + 16);
  h.clusterBits = loadBe32(p + 20);
  require(h.clusterBits >= kQcow2MinClusterBits && h.clusterBits <= kQcow2MaxClusterBits,
          "qcow2 {}: cluster_bits {} out of range ({}..{})", path, h.clusterBits,
          kQcow2MinClusterBits, kQcow2MaxClusterBits);
  const uint64_t clusterSize = h.clusterSize();
  require(data.size() >= clusterSize, "qcow2 {}: header cluster not read", path);
  h.size = loadBe64(p + 24);
  h.cryptMethod = loadBe32(p + 32);
  require(h.cryptMethod == 0, "qcow2 {}: encrypted images are not supported (crypt_method {})",
          path, h.cryptMethod);
  h.l1Size = loadBe32(p + 36);
  h.l1TableOffset = loadBe64(p + 40);
  h.refcountTableOffset = loadBe64(p + 48);
  h.refcountTableClusters = loadBe32(p + 56);
  h.nbSnapshots = loadBe32(p + 60);
  h.snapshotsOffset = loadBe64(p + 64);
  if (h.version == 2) {
    h.incompatibleFeatures = h.compatibleFeatures = h.autoclearFeatures = 0;
    h.refcountOrder = 4;
    h.headerLength = kQcow2V2HeaderLength;
    h.headerTail.clear();
  } else {
    h.incompatibleFeatures = loadBe64(p + 72);
    h.compatibleFeatures = loadBe64(p + 80);
    h.autoclearFeatures = loadBe64(p + 88);
    h.refcountOrder = loadBe32(p + 96);
    h.headerLength = loadBe32(p + 100);
    require(h.headerLength >= kQcow2V3HeaderLength && h.headerLength % 8 == 0 &&
                h.headerLength <= clusterSize,
            "qcow2 {}: header_length {} is invalid (a multiple of 8, {} to the cluster size)", path,
            h.headerLength, kQcow2V3HeaderLength);
    h.headerTail.assign(p + kQcow2V3HeaderLength, p + h.headerLength);
  }
  require(h.refcountOrder <= 6, "qcow2 {}: refcount_order {} is invalid (at most 6, 64 bits)", path,
          h.refcountOrder);

  // Extensions: between the header and the end of the first cluster.
  uint64_t offset = h.headerLength;
  for (;;) {
    require(offset + 8 <= clusterSize, "qcow2 {}: header extensions run past the header cluster",
            path);
    uint32_t type = loadBe32(p + offset);
    uint32_t length = loadBe32(p + offset + 4);
    offset += 8;
    if (type == kQcow2ExtEnd) break;
    require(length <= clusterSize - offset,
            "qcow2 {}: header extension 0x{:08x} ({} bytes) runs past the header cluster", path,
            type, length);
    h.extensions.push_back({type, std::vector<uint8_t>(p + offset, p + offset + length)});
    offset += (uint64_t{length} + 7) & ~7ull;
  }

  if (h.backingFileSize > 0) {
    require(h.backingFileSize <= kQcow2MaxBackingNameSize,
            "qcow2 {}: backing file name too long ({} bytes)", path, h.backingFileSize);
    require(h.backingFileOffset >= h.headerLength && h.backingFileOffset < clusterSize &&
                h.backingFileSize <= clusterSize - h.backingFileOffset,
            "qcow2 {}: backing file name (offset {}, {} bytes) is outside the header cluster", path,
            h.backingFileOffset, h.backingFileSize);
    h.backingFile.assign(reinterpret_cast<const char*>(p + h.backingFileOffset), h.backingFileSize);
    require(h.backingFile.find('\0') == std::string::npos,
            "qcow2 {}: backing file name contains a NUL byte", path);
  }

  uint64_t unknown = h.incompatibleFeatures & ~kQcow2IncompatKnown;
  require(unknown == 0, "qcow2 {}: unknown incompatible features: {}; refusing to open", path,
          h.featureNames(0, unknown));
  require(!(h.incompatibleFeatures & kQcow2IncompatDataFile),
          "qcow2 {}: images with an external data file are not supported", path);
  uint8_t compression = h.headerTail.empty() ? 0 : h.headerTail[0];
  require(compression <= 1, "qcow2 {}: unknown compression type {}", path, compression);
  require((compression != 0) == bool(h.incompatibleFeatures & kQcow2IncompatCompressionType),
          "qcow2 {}: compression_type {} disagrees with the compression type feature bit", path,
          compression);
  for (const auto& ext : h.extensions) {
    require(ext.type != kQcow2ExtCrypto, "qcow2 {}: encrypted images are not supported", path);
  }
  return h;
}

void Qcow2Header::validateLayout(uint64_t fileSize, const std::string& path) const {
  const uint64_t cs = clusterSize();
  const uint64_t l2Entries = cs / (extendedL2() ? 16 : 8);
  // Clusters of guest data one L1 entry covers; at most 2^(21+21-3) bytes, no overflow.
  const uint64_t l1Coverage = cs * l2Entries;
  const uint64_t l1Needed = size / l1Coverage + (size % l1Coverage != 0);
  require(uint64_t{l1Size} * 8 <= kQcow2MaxL1Bytes, "qcow2 {}: L1 table too large ({} entries)",
          path, l1Size);
  require(l1Size >= l1Needed,
          "qcow2 {}: L1 table has {} entries, too small for the virtual size {} (needs {})", path,
          l1Size, size, l1Needed);
  if (l1Size > 0) {
    require(l1TableOffset % cs == 0 && l1TableOffset != 0,
            "qcow2 {}: L1 table offset 0x{:x} is not cluster-aligned", path, l1TableOffset);
    require(l1TableOffset <= fileSize && uint64_t{l1Size} * 8 <= fileSize - l1TableOffset,
            "qcow2 {}: L1 table (offset 0x{:x}, {} entries) is outside the file", path,
            l1TableOffset, l1Size);
  }
  require(refcountTableClusters > 0 && uint64_t{refcountTableClusters} * cs <= kQcow2MaxRefcountTableBytes,
          "qcow2 {}: refcount table size of {} clusters is invalid", path, refcountTableClusters);
  require(refcountTableOffset % cs == 0 && refcountTableOffset != 0,
          "qcow2 {}: refcount table offset 0x{:x} is not cluster-aligned", path,
          refcountTableOffset);
  require(refcountTableOffset <= fileSize &&
              uint64_t{refcountTableClusters} * cs <= fileSize - refcountTableOffset,
          "qcow2 {}: refcount table (offset 0x{:x}, {} clusters) is outside the file", path,
          refcountTableOffset, refcountTableClusters);
  if (nbSnapshots > 0) {
    require(snapshotsOffset % cs == 0 && snapshotsOffset != 0 && snapshotsOffset < fileSize,
            "qcow2 {}: snapshot table offset 0x{:x} is invalid", path, snapshotsOffset);
  }
}

std::vector<uint8_t> Qcow2Header::serialize() {
  const uint64_t cs = clusterSize();
  if (version == 2) {
    headerLength = kQcow2V2HeaderLength;
    headerTail.clear();
  } else {
    if (headerTail.size() < 8) headerTail.resize(8, 0);
    headerLength = static_cast<uint32_t>((kQcow2V3HeaderLength + headerTail.size() + 7) & ~7ull);
  }
  std::vector<uint8_t> out(headerLength, 0);
  uint8_t* p = out.data();
  storeBe32(p, kQcow2Magic);
  storeBe32(p + 4, version);
  storeBe32(p + 20, clusterBits);
  storeBe64(p + 24, size);
  storeBe32(p + 32, cryptMethod);
  storeBe32(p + 36, l1Size);
  storeBe64(p + 40, l1TableOffset);
  storeBe64(p + 48, refcountTableOffset);
  storeBe32(p + 56, refcountTableClusters);
  storeBe32(p + 60, nbSnapshots);
  storeBe64(p + 64, snapshotsOffset);
  if (version == 3) {
    storeBe64(p + 72, incompatibleFeatures);
    storeBe64(p + 80, compatibleFeatures);
    storeBe64(p + 88, autoclearFeatures);
    storeBe32(p + 96, refcountOrder);
    storeBe32(p + 100, headerLength);
    std::copy(headerTail.begin(), headerTail.end(), out.begin() + kQcow2V3HeaderLength);
  }
  for (const auto& ext : extensions) {
    size_t at = out.size();
    out.resize(at + 8 + ((ext.data.size() + 7) & ~size_t{7}), 0);
    storeBe32(&out[at], ext.type);
    storeBe32(&out[at + 4], static_cast<uint32_t>(ext.data.size()));
    std::copy(ext.data.begin(), ext.data.end(), out.begin() + at + 8);
  }
  out.resize(out.size() + 8, 0);  // end marker
  require(backingFile.size() <= kQcow2MaxBackingNameSize, "backing file name too long: {}",
          backingFile);
  backingFileSize = static_cast<uint32_t>(backingFile.size());
  backingFileOffset = backingFile.empty() ? 0 : out.size();
  out.insert(out.end(), backingFile.begin(), backingFile.end());
  p = out.data();  // the vector grew: fetch the pointer again
  storeBe64(p + 8, backingFileOffset);
  storeBe32(p + 16, backingFileSize);
  require(out.size() <= cs, "qcow2 header and extensions ({} bytes) do not fit in a cluster",
          out.size());
  return out;
}

}  // namespace clonevm::block
