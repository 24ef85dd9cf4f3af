#pragma once
// The qcow2 header (QEMU docs/interop/qcow2.txt): parsing with every field checked, and
// serialization for new images. Header extensions are kept in order, unknown ones included, so a
// rewritten header loses nothing. A running image never rewrites the whole header: it updates
// single fields in place (features, refcount table location), which also keeps the extensions.

#include <cstdint>
#include <string>
#include <vector>

namespace clonevm::block {

inline constexpr uint32_t kQcow2Magic = 0x514649fb;  // "QFI\xfb"
inline constexpr uint32_t kQcow2V2HeaderLength = 72;
inline constexpr uint32_t kQcow2V3HeaderLength = 104;
inline constexpr uint32_t kQcow2MinClusterBits = 9;
inline constexpr uint32_t kQcow2MaxClusterBits = 21;
inline constexpr uint32_t kQcow2MaxBackingNameSize = 1023;
// As QEMU: larger tables are refused (they would take too much memory).
inline constexpr uint64_t kQcow2MaxL1Bytes = 32ull << 20;
inline constexpr uint64_t kQcow2MaxRefcountTableBytes = 8ull << 20;

// Header field offsets that a running image updates in place.
inline constexpr uint64_t kQcow2RefcountTableOffsetField = 48;  // + refcount_table_clusters at 56
inline constexpr uint64_t kQcow2IncompatibleFeaturesField = 72;
inline constexpr uint64_t kQcow2AutoclearFeaturesField = 88;

enum Qcow2Incompatible : uint64_t {
  kQcow2IncompatDirty = 1ull << 0,
  kQcow2IncompatCorrupt = 1ull << 1,
  kQcow2IncompatDataFile = 1ull << 2,
  kQcow2IncompatCompressionType = 1ull << 3,
  kQcow2IncompatExtendedL2 = 1ull << 4,
};
inline constexpr uint64_t kQcow2IncompatKnown = 0x1f;
inline constexpr uint64_t kQcow2CompatLazyRefcounts = 1ull << 0;

enum Qcow2ExtensionType : uint32_t {
  kQcow2ExtEnd = 0,
  kQcow2ExtBackingFormat = 0xe2792aca,
  kQcow2ExtFeatureTable = 0x6803f857,
  kQcow2ExtBitmaps = 0x23852875,
  kQcow2ExtCrypto = 0x0537be77,
  kQcow2ExtDataFile = 0x44415441,
};

enum class Qcow2Compression : uint8_t { kZlib = 0, kZstd = 1 };

struct Qcow2HeaderExtension {
  uint32_t type = 0;
  std::vector<uint8_t> data;
};

struct Qcow2Header {
  uint32_t version = 3;
  uint64_t backingFileOffset = 0;
  uint32_t backingFileSize = 0;
  uint32_t clusterBits = 16;
  uint64_t size = 0;
  uint32_t cryptMethod = 0;
  uint32_t l1Size = 0;
  uint64_t l1TableOffset = 0;
  uint64_t refcountTableOffset = 0;
  uint32_t refcountTableClusters = 0;
  uint32_t nbSnapshots = 0;
  uint64_t snapshotsOffset = 0;
  uint64_t incompatibleFeatures = 0;
  uint64_t compatibleFeatures = 0;
  uint64_t autoclearFeatures = 0;
  uint32_t refcountOrder = 4;
  uint32_t headerLength = 112;
  // Header bytes from offset 104 to headerLength (v3): compression_type, then any newer fields.
  std::vector<uint8_t> headerTail = std::vector<uint8_t>(8, 0);
  std::vector<Qcow2HeaderExtension> extensions;  // without the end marker
  std::string backingFile;

  uint64_t clusterSize() const { return 1ull << clusterBits; }
  Qcow2Compression compressionType() const {
    return headerTail.empty() ? Qcow2Compression::kZlib : Qcow2Compression{headerTail[0]};
  }
  bool extendedL2() const { return incompatibleFeatures & kQcow2IncompatExtendedL2; }
  std::string backingFormat() const;  // from the backing format extension, "" if none
  void setBackingFormat(const std::string& format);

  // Parses the first cluster of an image (`data` holds at least 512 bytes, and the whole cluster
  // when the cluster is larger; bytes past the end of the file are zeros). Refuses malformed
  // headers and features this implementation does not support, naming the file.
  static Qcow2Header parse(const std::vector<uint8_t>& data, const std::string& path);
  // Checks table locations against the file: aligned, inside the file, large enough.
  void validateLayout(uint64_t fileSize, const std::string& path) const;
  // Header, extensions, end marker and backing file name; fits in one cluster.
  std::vector<uint8_t> serialize();

  // Names of the set bits of `bits` from the feature name table ("bit 5" when unnamed).
  std::string featureNames(uint8_t featureType, uint64_t bits) const;
};

}  // namespace clonevm::block
