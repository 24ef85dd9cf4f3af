#pragma once
// Transport-independent constants of the virtio 1.x spec (OASIS virtio v1.2).

#include <cstdint>

namespace clonevm::vmm::virtio {

// Device types (spec 5).
inline constexpr uint32_t kTypeNet = 1;
inline constexpr uint32_t kTypeBlock = 2;
inline constexpr uint32_t kTypeConsole = 3;
inline constexpr uint32_t kTypeRng = 4;
inline constexpr uint32_t kTypeBalloon = 5;
inline constexpr uint32_t kTypeScsi = 8;
inline constexpr uint32_t kType9p = 9;
inline constexpr uint32_t kTypeGpu = 16;
inline constexpr uint32_t kTypeInput = 18;
inline constexpr uint32_t kTypeVsock = 19;
inline constexpr uint32_t kTypeIommu = 23;
inline constexpr uint32_t kTypeFs = 26;
inline constexpr uint32_t kTypePmem = 27;

// Device status bits (spec 2.1).
inline constexpr uint8_t kStatusAcknowledge = 0x01;
inline constexpr uint8_t kStatusDriver = 0x02;
inline constexpr uint8_t kStatusDriverOk = 0x04;
inline constexpr uint8_t kStatusFeaturesOk = 0x08;
inline constexpr uint8_t kStatusNeedsReset = 0x40;
inline constexpr uint8_t kStatusFailed = 0x80;

// Feature bits (spec 6) that the transport looks at.
inline constexpr unsigned kFeatureIndirectDesc = 28;
inline constexpr unsigned kFeatureEventIdx = 29;
inline constexpr unsigned kFeatureVersion1 = 32;
inline constexpr unsigned kFeatureAccessPlatform = 33;
inline constexpr unsigned kFeatureRingPacked = 34;
inline constexpr unsigned kFeatureInOrder = 35;
inline constexpr unsigned kFeatureOrderPlatform = 36;
inline constexpr unsigned kFeatureSrIov = 37;
inline constexpr unsigned kFeatureNotificationData = 38;
inline constexpr unsigned kFeatureNotifConfigData = 39;
inline constexpr unsigned kFeatureRingReset = 40;

constexpr uint64_t feature(unsigned bit) { return uint64_t{1} << bit; }

// The largest queue a driver may be offered (spec 2.7: packed ring sizes are < 2^15).
inline constexpr uint16_t kMaxQueueSize = 32768;

// Ring part sizes and alignments (spec 2.6 split, 2.8 packed), for validating what the
// driver programs.
constexpr uint64_t splitDescTableSize(uint16_t size) { return 16ull * size; }
constexpr uint64_t splitAvailRingSize(uint16_t size) { return 6 + 2ull * size; }  // + used_event
constexpr uint64_t splitUsedRingSize(uint16_t size) { return 6 + 8ull * size; }   // + avail_event
inline constexpr uint64_t kSplitDescAlign = 16;
inline constexpr uint64_t kSplitAvailAlign = 2;
inline constexpr uint64_t kSplitUsedAlign = 4;
constexpr uint64_t packedDescRingSize(uint16_t size) { return 16ull * size; }
inline constexpr uint64_t kPackedEventSuppressionSize = 4;
inline constexpr uint64_t kPackedDescAlign = 16;
inline constexpr uint64_t kPackedEventAlign = 4;

}  // namespace clonevm::vmm::virtio
