#include "dev-block/virtio_blk_request.h"

#include <fmt/format.h>

#include <cstring>

namespace clonevm::block {
namespace {

using ipc::vhost::GuestSpan;

struct OutHeader {
  uint32_t type;
  uint32_t reserved;
  uint64_t sector;
};
static_assert(sizeof(OutHeader) == 16);

struct DiscardSegment {
  uint64_t sector;
  uint32_t sectors;
  uint32_t flags;
};
static_assert(sizeof(DiscardSegment) == 16);

// The bytes [skip, skip + length) of `spans`, as spans. The caller made sure they exist.
std::vector<GuestSpan> slice(std::span<const GuestSpan> spans, uint64_t skip, uint64_t length) {
  std::vector<GuestSpan> out;
  for (const GuestSpan& span : spans) {
    if (length == 0) break;
    if (skip >= span.size()) {
      skip -= span.size();
      continue;
    }
    uint64_t take = std::min<uint64_t>(span.size() - skip, length);
    out.push_back(span.subspan(skip, take));
    length -= take;
    skip = 0;
  }
  return out;
}

ParsedBlkRequest failed(ParsedBlkRequest parsed, uint8_t status, std::string reason) {
  parsed.op = BlkOp::kFailed;
  parsed.failStatus = status;
  parsed.failReason = std::move(reason);
  parsed.data.clear();
  parsed.ranges.clear();
  return parsed;
}

// [sector, sector + sectors) inside the capacity, without overflow.
bool insideCapacity(uint64_t sector, uint64_t sectors, uint64_t capacity) {
  return sector <= capacity && sectors <= capacity - sector;
}

}  // namespace

ParsedBlkRequest parseBlkRequest(const ipc::vhost::VirtqueueRequest& request,
                                 const BlkLimits& limits) {
  ParsedBlkRequest parsed;
  auto writable = request.writable();
  if (!writable.empty() && !writable.back().empty()) {
    parsed.status = writable.back().subspan(writable.back().size() - 1, 1);
  } else if (request.writableBytes() > 0) {
    // The last writable buffer is empty: the status byte is the last byte written at all.
    for (auto it = writable.rbegin(); it != writable.rend(); ++it) {
      if (!it->empty()) {
        parsed.status = it->subspan(it->size() - 1, 1);
        break;
      }
    }
  }
  if (parsed.status.empty()) {
    return failed(std::move(parsed), blk::kStatusIoErr, "no writable status byte");
  }
  uint64_t writableData = request.writableBytes() - 1;

  OutHeader header{};
  if (request.readableBytes() < sizeof(header)) {
    return failed(std::move(parsed), blk::kStatusIoErr,
                  fmt::format("{} readable bytes, the header needs 16", request.readableBytes()));
  }
  request.read(0, std::span<uint8_t>(reinterpret_cast<uint8_t*>(&header), sizeof(header)));
  uint64_t payload = request.readableBytes() - sizeof(header);

  switch (header.type) {
    case blk::kTypeIn:
    case blk::kTypeOut: {
      bool isRead = header.type == blk::kTypeIn;
      uint64_t length = isRead ? writableData : payload;
      if (length % kSectorSize != 0) {
        return failed(std::move(parsed), blk::kStatusIoErr,
                      fmt::format("{} of {} bytes is not whole sectors", isRead ? "read" : "write",
                                  length));
      }
      if (!insideCapacity(header.sector, length / kSectorSize, limits.capacitySectors)) {
        return failed(std::move(parsed), blk::kStatusIoErr,
                      fmt::format("sectors {}+{} are beyond the capacity of {}", header.sector,
                                  length / kSectorSize, limits.capacitySectors));
      }
      if (!isRead && limits.readOnly) {
        return failed(std::move(parsed), blk::kStatusIoErr, "write to a read-only disk");
      }
      parsed.op = isRead ? BlkOp::kRead : BlkOp::kWrite;
      parsed.offset = header.sector * kSectorSize;
      parsed.length = length;
      parsed.data = isRead ? slice(writable, 0, length)
                           : slice(request.readable(), sizeof(header), length);
      if (parsed.data.size() > limits.maxDataSegments) {
        return failed(std::move(parsed), blk::kStatusIoErr,
                      fmt::format("{} data buffers, at most {}", parsed.data.size(),
                                  limits.maxDataSegments));
      }
      return parsed;
    }

    case blk::kTypeFlush:
      parsed.op = BlkOp::kFlush;
      return parsed;

    case blk::kTypeGetId:
      parsed.op = BlkOp::kGetId;
      parsed.length = std::min<uint64_t>(writableData, blk::kIdBytes);
      parsed.data = slice(writable, 0, parsed.length);
      return parsed;

    case blk::kTypeDiscard:
    case blk::kTypeWriteZeroes: {
      bool discard = header.type == blk::kTypeDiscard;
      const char* name = discard ? "discard" : "write-zeroes";
      if (!(discard ? limits.discard : limits.writeZeroes)) {
        return failed(std::move(parsed), blk::kStatusUnsupported,
                      fmt::format("{} was not negotiated", name));
      }
      if (limits.readOnly) {
        return failed(std::move(parsed), blk::kStatusIoErr,
                      fmt::format("{} on a read-only disk", name));
      }
      uint32_t maxSegments = discard ? limits.maxDiscardSegments : limits.maxWriteZeroesSegments;
      uint32_t maxSectors = discard ? limits.maxDiscardSectors : limits.maxWriteZeroesSectors;
      if (payload == 0 || payload % sizeof(DiscardSegment) != 0 ||
          payload / sizeof(DiscardSegment) > maxSegments) {
        return failed(std::move(parsed), blk::kStatusUnsupported,
                      fmt::format("{} with {} payload bytes: not 1 to {} segments of 16", name,
                                  payload, maxSegments));
      }
      for (uint64_t i = 0; i < payload / sizeof(DiscardSegment); ++i) {
        DiscardSegment segment{};
        request.read(sizeof(header) + i * sizeof(segment),
                     std::span<uint8_t>(reinterpret_cast<uint8_t*>(&segment), sizeof(segment)));
        // Discard has no flags; write-zeroes has only UNMAP (5.2.6.2).
        uint32_t allowed = discard ? 0 : blk::kWriteZeroesFlagUnmap;
        if ((segment.flags & ~allowed) != 0) {
          return failed(std::move(parsed), blk::kStatusUnsupported,
                        fmt::format("{} segment flags {:#x}", name, segment.flags));
        }
        if (segment.sectors > maxSectors) {
          return failed(std::move(parsed), blk::kStatusIoErr,
                        fmt::format("{} of {} sectors, at most {}", name, segment.sectors,
                                    maxSectors));
        }
        if (!insideCapacity(segment.sector, segment.sectors, limits.capacitySectors)) {
          return failed(std::move(parsed), blk::kStatusIoErr,
                        fmt::format("{} of sectors {}+{} beyond the capacity of {}", name,
                                    segment.sector, segment.sectors, limits.capacitySectors));
        }
        parsed.ranges.push_back({segment.sector * kSectorSize, segment.sectors * kSectorSize,
                                 (segment.flags & blk::kWriteZeroesFlagUnmap) != 0});
      }
      parsed.op = discard ? BlkOp::kDiscard : BlkOp::kWriteZeroes;
      return parsed;
    }

    default:
      return failed(std::move(parsed), blk::kStatusUnsupported,
                    fmt::format("request type {}", header.type));
  }
}

}  // namespace clonevm::block
