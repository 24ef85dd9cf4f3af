// Runs the fuzzer's entry point over crafted inputs (and the saved corpus), so every build
// exercises the paths the fuzzer guards: framing, each request's validation, memory tables,
// and hostile rings. Also checks that no input leaks a file descriptor.

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "ipc/vhost-user/message.h"
#include "ipc/vhost-user/virtqueue.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace clonevm::ipc::vhost {
namespace {

size_t openFdCount() {
  size_t count = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    ++count;
  }
  return count;
}

// Builds inputs in the fuzzer's format.
class Input {
 public:
  static Input stream() { return Input(0); }
  static Input script() { return Input(1); }

  // Stream mode: a raw message.
  Input& raw(uint32_t request, uint32_t flags, std::vector<uint8_t> payload,
             int64_t sizeOverride = -1) {
    MessageHeader header{request, flags,
                         static_cast<uint32_t>(sizeOverride >= 0 ? sizeOverride : payload.size())};
    append(&header, sizeof(header));
    bytes_.insert(bytes_.end(), payload.begin(), payload.end());
    return *this;
  }
  Input& rawBytes(std::vector<uint8_t> b) {
    bytes_.insert(bytes_.end(), b.begin(), b.end());
    return *this;
  }
  // Script mode records.
  Input& message(FrontendRequest request, uint8_t flags, std::vector<uint8_t> payload,
                 uint8_t fdCount = 0, uint8_t fdKind = 0) {
    bytes_.push_back(0);
    bytes_.push_back(static_cast<uint8_t>(request));
    bytes_.push_back(flags);
    bytes_.push_back(static_cast<uint8_t>(payload.size()));
    bytes_.insert(bytes_.end(), payload.begin(), payload.end());
    bytes_.push_back(static_cast<uint8_t>(fdCount | (fdKind << 2)));
    return *this;
  }
  Input& kick(uint8_t queue = 0) {
    bytes_.push_back(1);
    bytes_.push_back(queue);
    return *this;
  }
  // Writes into guest memory at `offset` (the ring: desc 0x0, avail 0x100, used 0x200).
  Input& poke(uint16_t offset, std::vector<uint8_t> b) {
    bytes_.push_back(2);
    bytes_.push_back(static_cast<uint8_t>(offset));
    bytes_.push_back(static_cast<uint8_t>(offset >> 8));
    bytes_.push_back(static_cast<uint8_t>(b.size()));
    bytes_.insert(bytes_.end(), b.begin(), b.end());
    return *this;
  }
  Input& descriptor(uint16_t index, uint64_t address, uint32_t length, uint16_t flags,
                    uint16_t next) {
    VringDescriptor d{address, length, flags, next};
    return poke(static_cast<uint16_t>(16 * index), of(d));
  }
  // Publishes `heads` in the avail ring (from index 0).
  Input& avail(std::vector<uint16_t> heads) {
    std::vector<uint8_t> ring(4 + 2 * heads.size());
    uint16_t idx = static_cast<uint16_t>(heads.size());
    std::memcpy(ring.data() + 2, &idx, 2);
    std::memcpy(ring.data() + 4, heads.data(), 2 * heads.size());
    return poke(0x100, ring);
  }
  template <typename T>
  static std::vector<uint8_t> of(const T& v) {
    auto* p = reinterpret_cast<const uint8_t*>(&v);
    return std::vector<uint8_t>(p, p + sizeof(T));
  }
  const std::vector<uint8_t>& bytes() const { return bytes_; }

 private:
  explicit Input(uint8_t mode) { bytes_.push_back(mode); }
  void append(const void* p, size_t n) {
    auto* b = static_cast<const uint8_t*>(p);
    bytes_.insert(bytes_.end(), b, b + n);
  }
  std::vector<uint8_t> bytes_;
};

constexpr uint64_t kData = 0x10000 + 0x1000;  // guest address of a free buffer

std::vector<Input> craftedInputs() {
  using R = FrontendRequest;
  std::vector<Input> inputs;
  // Stream: a normal negotiation.
  inputs.push_back(Input::stream()
                       .raw(1, kVersion, {})
                       .raw(15, kVersion, {})
                       .raw(2, kVersion, Input::of(uint64_t{1} << 32))
                       .raw(16, kVersion, Input::of(uint64_t{0x1ff}))
                       .raw(3, kVersion | kNeedReplyFlag, {})
                       .raw(17, kVersion, {})
                       .raw(36, kVersion, {})
                       .raw(40, kVersion, {}));
  // Stream: framing errors.
  inputs.push_back(Input::stream().rawBytes({1, 0, 0}));
  inputs.push_back(Input::stream().raw(1, kVersion, {}, 4096 + 1));
  inputs.push_back(Input::stream().raw(1, 0x2, {}));
  inputs.push_back(Input::stream().raw(2, kVersion, {1, 2, 3}, 8));
  inputs.push_back(Input::stream().raw(99, kVersion | kNeedReplyFlag, {}).raw(1, kVersion, {}));
  inputs.push_back(Input::stream().raw(5, kVersion, Input::of(MemoryTable{})));
  inputs.push_back(Input::stream().raw(24, kVersion, Input::of(ConfigHeader{0, 200, 0})));
  inputs.push_back(Input::stream().raw(12, kVersion, Input::of(uint64_t{0})));
  // Script: a valid request through the XOR device.
  inputs.push_back(Input::script()
                       .poke(0x1000, {1, 2, 3, 4})
                       .descriptor(0, kData, 4, 0, 0)
                       .descriptor(1, kData + 0x100, 4, kDescFlagWrite, 0)
                       .descriptor(0, kData, 4, kDescFlagNext, 1)
                       .avail({0})
                       .kick());
  // Script: hostile rings.
  inputs.push_back(Input::script()
                       .descriptor(0, kData, 4, kDescFlagNext, 1)
                       .descriptor(1, kData, 4, kDescFlagNext, 0)
                       .avail({0})
                       .kick());
  inputs.push_back(Input::script().avail({8}).kick());
  inputs.push_back(Input::script().descriptor(0, kData, 4, kDescFlagNext, 9000).avail({0}).kick());
  inputs.push_back(Input::script().descriptor(0, kData, 0, kDescFlagIndirect, 0).avail({0}).kick());
  inputs.push_back(
      Input::script().descriptor(0, kData, 16 * 2000, kDescFlagIndirect, 0).avail({0}).kick());
  inputs.push_back(Input::script()
                       .poke(0x1000, Input::of(VringDescriptor{kData, 16, kDescFlagIndirect, 0}))
                       .descriptor(0, kData, 16, kDescFlagIndirect, 0)
                       .avail({0})
                       .kick());
  inputs.push_back(Input::script()
                       .poke(0x1000, Input::of(VringDescriptor{kData, 16, kDescFlagNext, 0}))
                       .descriptor(0, kData, 16, kDescFlagIndirect, 0)
                       .avail({0})
                       .kick());
  inputs.push_back(Input::script().descriptor(0, ~0ull - 2, 16, 0, 0).avail({0}).kick());
  inputs.push_back(Input::script().poke(0x102, {0xff, 0x00}).kick());  // avail idx far ahead
  // Script: messages that change memory and queues under a running ring.
  inputs.push_back(Input::script()
                       .message(R::kSetMemTable, 0,
                                Input::of(MemoryTableHeader{1, 0}), 1, 1)
                       .avail({0})
                       .kick());
  {
    std::vector<uint8_t> table = Input::of(MemoryTableHeader{1, 0});
    auto region = Input::of(MemoryRegion{0x10000, 0x10000, 0x7000000, 0});
    table.insert(table.end(), region.begin(), region.end());
    inputs.push_back(Input::script().message(R::kSetMemTable, 1, table, 1, 2).avail({0}).kick());
  }
  inputs.push_back(Input::script()
                       .message(R::kRemMemReg, 1,
                                Input::of(SingleMemoryRegion{0, {0x10000, 0x10000, 0, 0}}))
                       .kick());
  inputs.push_back(Input::script()
                       .message(R::kGetInflightFd, 1, Input::of(InflightDescription{0, 0, 1, 8, 0}))
                       .message(R::kSetInflightFd, 1, Input::of(InflightDescription{4096, 0, 1, 8, 0}), 1, 1)
                       .message(R::kSetVringKick, 1, Input::of(uint64_t{0}), 1, 0)
                       .kick());
  inputs.push_back(Input::script()
                       .message(R::kGetVringBase, 1, Input::of(VringState{0, 0}))
                       .message(R::kSetVringBase, 1, Input::of(VringState{0, 5}))
                       .message(R::kSetVringKick, 1, Input::of(uint64_t{0}), 1, 3)
                       .message(R::kResetDevice, 1, {})
                       .kick());
  inputs.push_back(Input::script()
                       .message(R::kSetVringCall, 1, Input::of(uint64_t{0}), 3, 0)
                       .message(R::kSetBackendReqFd, 1, {}, 1, 3)
                       .message(R::kSetStatus, 1, Input::of(uint64_t{0x1ff}))
                       .message(R::kGetConfig, 1, Input::of(ConfigHeader{0xfffffff0, 0x20, 0})));
  return inputs;
}

TEST(MessageFuzzerCorpusTest, CraftedInputsRunCleanly) {
  size_t before = openFdCount();
  // CLONE_FUZZ_WRITE_SEEDS=<dir> also writes the inputs there, as seeds for the fuzzer.
  const char* seeds = std::getenv("CLONE_FUZZ_WRITE_SEEDS");
  int n = 0;
  for (const auto& input : craftedInputs()) {
    EXPECT_EQ(LLVMFuzzerTestOneInput(input.bytes().data(), input.bytes().size()), 0);
    if (seeds != nullptr) {
      std::ofstream out(std::filesystem::path(seeds) / fmt::format("seed-{:02}", n++),
                        std::ios::binary);
      out.write(reinterpret_cast<const char*>(input.bytes().data()),
                static_cast<std::streamsize>(input.bytes().size()));
    }
  }
  EXPECT_EQ(openFdCount(), before) << "a file descriptor leaked";
}

TEST(MessageFuzzerCorpusTest, SavedCorpusRunsCleanly) {
  size_t before = openFdCount();
  size_t count = 0;
  for (const auto& entry : std::filesystem::directory_iterator(CLONE_FUZZ_CORPUS_DIR)) {
    if (!entry.is_regular_file()) continue;
    std::ifstream file(entry.path(), std::ios::binary);
    std::vector<uint8_t> data((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    SCOPED_TRACE(entry.path().string());
    EXPECT_EQ(LLVMFuzzerTestOneInput(data.data(), data.size()), 0);
    ++count;
  }
  EXPECT_GT(count, 0u);
  EXPECT_EQ(openFdCount(), before) << "a file descriptor leaked";
}

}  // namespace
}  // namespace clonevm::ipc::vhost
