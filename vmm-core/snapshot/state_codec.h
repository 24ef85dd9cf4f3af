#pragma once
// The state file's encoding: a small, versioned TLV format (docs/FORK.md).
//
//   file   := magic "CLONESTA" | u32 version | u32 0 | record*
//   record := u32 tag | u32 0 | u64 length | length bytes (a value or nested records)
//
// Integers are little-endian. A level's records are found by tag; unknown tags are skipped
// (a newer writer may add fields without a version bump), missing ones are a clear error.
// Fixed-size values (KVM's structs) must have exactly their size: a shorter or longer
// record is refused instead of read. The file's integrity (flipped bytes) is checked
// separately, against the SHA-256 in the manifest.

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "common/error.h"

namespace clonevm::vmm::snapshot {

inline constexpr char kStateMagic[8] = {'C', 'L', 'O', 'N', 'E', 'S', 'T', 'A'};
inline constexpr uint32_t kStateVersion = 1;

class StateWriter {
 public:
  // A nested level; write its records, then end() it.
  void begin(uint32_t tag);
  void end();

  void bytes(uint32_t tag, std::span<const uint8_t> value);
  void u64(uint32_t tag, uint64_t value) { pod(tag, value); }
  template <typename T>
  void pod(uint32_t tag, const T& value) {
    static_assert(std::is_trivially_copyable_v<T>);
    bytes(tag, {reinterpret_cast<const uint8_t*>(&value), sizeof(T)});
  }
  template <typename T>
  void podVector(uint32_t tag, const std::vector<T>& values) {
    static_assert(std::is_trivially_copyable_v<T>);
    bytes(tag, {reinterpret_cast<const uint8_t*>(values.data()), values.size() * sizeof(T)});
  }

  // The whole file: header and top-level records. All levels must be ended.
  std::vector<uint8_t> finish() const;

 private:
  void header(uint32_t tag, uint64_t length);
  std::vector<uint8_t> body_;
  std::vector<size_t> open_;  // offsets of the length fields of unfinished levels
};

class StateReader {
 public:
  // Parses a whole file (header checked); `what` names it in errors.
  static StateReader file(std::span<const uint8_t> data, std::string what);

  bool has(uint32_t tag) const;
  // Every record with `tag`, in order (repeated levels: one per vCPU).
  std::vector<StateReader> all(uint32_t tag) const;
  StateReader level(uint32_t tag) const;
  std::span<const uint8_t> bytes(uint32_t tag) const;
  uint64_t u64(uint32_t tag) const { return pod<uint64_t>(tag); }
  template <typename T>
  T pod(uint32_t tag) const {
    static_assert(std::is_trivially_copyable_v<T>);
    auto value = bytes(tag);
    require(value.size() == sizeof(T), "{}: field {} has {} bytes, expected {}", what_, tag,
            value.size(), sizeof(T));
    T out;
    std::memcpy(&out, value.data(), sizeof(T));
    return out;
  }
  template <typename T>
  std::vector<T> podVector(uint32_t tag) const {
    static_assert(std::is_trivially_copyable_v<T>);
    auto value = bytes(tag);
    require(value.size() % sizeof(T) == 0, "{}: field {} has {} bytes, not a multiple of {}",
            what_, tag, value.size(), sizeof(T));
    std::vector<T> out(value.size() / sizeof(T));
    if (!out.empty()) std::memcpy(out.data(), value.data(), value.size());
    return out;
  }

 private:
  struct Record {
    uint32_t tag;
    std::span<const uint8_t> value;
  };
  StateReader(std::span<const uint8_t> data, std::string what);
  const Record* find(uint32_t tag) const;

  std::string what_;
  std::vector<Record> records_;
};

}  // namespace clonevm::vmm::snapshot
