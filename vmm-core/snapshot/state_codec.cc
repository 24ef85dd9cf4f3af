#include "vmm-core/snapshot/state_codec.h"

namespace clonevm::vmm::snapshot {
namespace {

constexpr size_t kRecordHeader = 16;
constexpr size_t kFileHeader = 16;

template <typename T>
void append(std::vector<uint8_t>& out, T value) {
  uint8_t raw[sizeof(T)];
  std::memcpy(raw, &value, sizeof(T));
  out.insert(out.end(), raw, raw + sizeof(T));
}

template <typename T>
T load(const uint8_t* at) {
  T value;
  std::memcpy(&value, at, sizeof(T));
  return value;
}

}  // namespace

void StateWriter::header(uint32_t tag, uint64_t length) {
  append<uint32_t>(body_, tag);
  append<uint32_t>(body_, 0);
  append<uint64_t>(body_, length);
}

void StateWriter::begin(uint32_t tag) {
  header(tag, 0);
  open_.push_back(body_.size() - sizeof(uint64_t));
}

void StateWriter::end() {
  require(!open_.empty(), "state writer: end() without begin()");
  size_t lengthAt = open_.back();
  open_.pop_back();
  uint64_t length = body_.size() - (lengthAt + sizeof(uint64_t));
  std::memcpy(body_.data() + lengthAt, &length, sizeof(length));
}

void StateWriter::bytes(uint32_t tag, std::span<const uint8_t> value) {
  header(tag, value.size());
  body_.insert(body_.end(), value.begin(), value.end());
}

std::vector<uint8_t> StateWriter::finish() const {
  require(open_.empty(), "state writer: {} level(s) not ended", open_.size());
  std::vector<uint8_t> out(kStateMagic, kStateMagic + sizeof(kStateMagic));
  append<uint32_t>(out, kStateVersion);
  append<uint32_t>(out, 0);
  out.insert(out.end(), body_.begin(), body_.end());
  return out;
}

StateReader StateReader::file(std::span<const uint8_t> data, std::string what) {
  require(data.size() >= kFileHeader && std::memcmp(data.data(), kStateMagic, 8) == 0,
          "{}: not a Clone state file (bad magic)", what);
  uint32_t version = load<uint32_t>(data.data() + 8);
  require(version == kStateVersion, "{}: state format version {} (this build reads {})", what,
          version, kStateVersion);
  return StateReader(data.subspan(kFileHeader), std::move(what));
}

StateReader::StateReader(std::span<const uint8_t> data, std::string what) : what_(std::move(what)) {
  size_t at = 0;
  while (at < data.size()) {
    require(data.size() - at >= kRecordHeader, "{}: truncated record header at byte {}", what_, at);
    uint32_t tag = load<uint32_t>(data.data() + at);
    uint32_t reserved = load<uint32_t>(data.data() + at + 4);
    uint64_t length = load<uint64_t>(data.data() + at + 8);
    require(reserved == 0, "{}: record {} at byte {} is malformed", what_, tag, at);
    at += kRecordHeader;
    require(length <= data.size() - at, "{}: record {} claims {} bytes, {} left", what_, tag,
            length, data.size() - at);
    records_.push_back({tag, data.subspan(at, length)});
    at += length;
  }
}

const StateReader::Record* StateReader::find(uint32_t tag) const {
  for (const auto& record : records_) {
    if (record.tag == tag) return &record;
  }
  return nullptr;
}

bool StateReader::has(uint32_t tag) const { return find(tag) != nullptr; }

std::vector<StateReader> StateReader::all(uint32_t tag) const {
  std::vector<StateReader> out;
  for (const auto& record : records_) {
    if (record.tag == tag) out.push_back(StateReader(record.value, what_));
  }
  return out;
}

StateReader StateReader::level(uint32_t tag) const {
  return StateReader(bytes(tag), what_);
}

std::span<const uint8_t> StateReader::bytes(uint32_t tag) const {
  const Record* record = find(tag);
  require(record != nullptr, "{}: field {} is missing", what_, tag);
  return record->value;
}

}  // namespace clonevm::vmm::snapshot
