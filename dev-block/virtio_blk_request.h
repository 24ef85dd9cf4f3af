#pragma once
// virtio-blk requests (VIRTIO 1.2 section 5.2.6) as the device receives them from a hostile
// driver. parseBlkRequest() is the one place where guest-supplied sectors, lengths and
// segment lists are checked: against the capacity (with overflow), the sector size, the
// segment limits the config space advertises, and the layout (header first, status byte
// last). Everything after it trusts a ParsedBlkRequest.

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "ipc/vhost-user/virtqueue.h"

namespace clonevm::block {

inline constexpr uint64_t kSectorSize = 512;

// Request types and status values (VIRTIO 1.2 5.2.6).
namespace blk {
inline constexpr uint32_t kTypeIn = 0;
inline constexpr uint32_t kTypeOut = 1;
inline constexpr uint32_t kTypeFlush = 4;
inline constexpr uint32_t kTypeGetId = 8;
inline constexpr uint32_t kTypeDiscard = 11;
inline constexpr uint32_t kTypeWriteZeroes = 13;
inline constexpr uint8_t kStatusOk = 0;
inline constexpr uint8_t kStatusIoErr = 1;
inline constexpr uint8_t kStatusUnsupported = 2;
inline constexpr uint32_t kIdBytes = 20;
inline constexpr uint32_t kWriteZeroesFlagUnmap = 1;
}  // namespace blk

// What the parser checks requests against: the device's capacity and advertised limits.
struct BlkLimits {
  uint64_t capacitySectors = 0;
  bool readOnly = false;
  bool discard = false;       // DISCARD negotiated
  bool writeZeroes = false;   // WRITE_ZEROES negotiated
  uint32_t maxDataSegments = 1024;  // guest buffers of one IN/OUT (IOV_MAX)
  uint32_t maxDiscardSectors = 0;
  uint32_t maxDiscardSegments = 0;
  uint32_t maxWriteZeroesSectors = 0;
  uint32_t maxWriteZeroesSegments = 0;
};

// One range of a DISCARD or WRITE_ZEROES request, in bytes, inside the capacity.
struct BlkRange {
  uint64_t offset = 0;
  uint64_t length = 0;
  bool unmap = false;
};

enum class BlkOp { kRead, kWrite, kFlush, kGetId, kDiscard, kWriteZeroes, kFailed };

struct ParsedBlkRequest {
  BlkOp op = BlkOp::kFailed;
  uint8_t failStatus = blk::kStatusIoErr;  // for kFailed: the status to report
  std::string failReason;                  // for kFailed: why, for the log
  uint64_t offset = 0;                     // kRead/kWrite: byte offset on the disk
  uint64_t length = 0;                     // kRead/kWrite: bytes; kGetId: bytes to write
  std::vector<ipc::vhost::GuestSpan> data;  // kRead/kWrite/kGetId: the guest buffers
  std::vector<BlkRange> ranges;            // kDiscard/kWriteZeroes
  // The status byte: the last byte of the last writable buffer. Empty when the driver gave
  // no writable byte at all; such a request is completed with nothing written.
  std::span<uint8_t> status;
};

ParsedBlkRequest parseBlkRequest(const ipc::vhost::VirtqueueRequest& request,
                                 const BlkLimits& limits);

}  // namespace clonevm::block
