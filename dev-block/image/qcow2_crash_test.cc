// Crash consistency: a child writes through the library and flushes now and then, reporting
// each flush; the parent kills it (SIGKILL) at a random moment. `qemu-img check -r all` must
// then leave a clean image, and every write flushed before the kill must be there.

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <numeric>
#include <random>

#include "dev-block/image/image_test_util.h"
#include "dev-block/image/open_image.h"
#include "dev-block/image/qcow2_create.h"

namespace clonevm::block {
namespace {

constexpr uint64_t kSize = 32 << 20;
constexpr uint64_t kSlot = 32 << 10;  // each write stays inside its own slot
constexpr uint32_t kSlots = kSize / kSlot;
constexpr uint32_t kWritesPerFlush = 8;

struct Write {
  uint64_t offset;
  std::vector<uint8_t> data;
};

// Write i of a run: its own slot, a random range in it, random bytes. Child and parent both
// compute it from the seed.
std::vector<Write> plannedWrites(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint32_t> slots(kSlots);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng);
  std::vector<Write> writes;
  for (uint32_t slot : slots) {
    uint64_t start = rng() % kSlot;
    uint64_t length = 1 + rng() % (kSlot - start);
    writes.push_back({slot * kSlot + start, test::randomBytes(rng, length)});
  }
  return writes;
}

[[noreturn]] void childWrites(const std::string& path, const std::vector<Write>& writes, int report) {
  try {
    auto image = openImage({path, ImageFormat::kQcow2, false});
    for (uint32_t i = 0; i < writes.size(); ++i) {
      std::vector<ImageExtent> extents;
      image->mapWrite(writes[i].offset, writes[i].data.size(), extents);
      uint64_t done = 0;
      for (const auto& e : extents) {
        pwriteFull(e.fd, writes[i].data.data() + done, e.length, e.fileOffset, path);
        done += e.length;
      }
      if ((i + 1) % kWritesPerFlush == 0) {
        image->flush();
        uint32_t flushed = i + 1;
        if (::write(report, &flushed, sizeof flushed) != sizeof flushed) ::_exit(3);
      }
    }
    for (;;) ::pause();  // wait for the kill
  } catch (...) {
    ::_exit(2);
  }
}

TEST(Qcow2Crash, FlushedWritesSurviveKill) {
  std::mt19937_64 rng(2026);
  for (int iteration = 0; iteration < 6; ++iteration) {
    SCOPED_TRACE(fmt::format("iteration {}", iteration));
    test::ScratchDir dir;
    std::string base = dir.file("base.raw"), img = dir.file("crash.qcow2");
    ASSERT_EQ(test::shell(fmt::format("head -c {} /dev/urandom > {}", kSize, base)), 0);
    createQcow2(img, {.size = kSize,
                      .clusterBits = iteration % 3 == 2 ? 12u : 16u,
                      .lazyRefcounts = iteration % 2 == 1,
                      .backingFile = base,
                      .backingFormat = "raw"});
    const uint64_t seed = rng();
    auto writes = plannedWrites(seed);

    int fds[2];
    ASSERT_EQ(::pipe(fds), 0);
    pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      ::close(fds[0]);
      childWrites(img, writes, fds[1]);
    }
    ::close(fds[1]);
    ::usleep(static_cast<useconds_t>(20000 + rng() % 400000));
    ::kill(child, SIGKILL);
    int status = 0;
    ::waitpid(child, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status)) << "child exited early with status " << WEXITSTATUS(status);
    uint32_t flushed = 0, value;
    while (::read(fds[0], &value, sizeof value) == sizeof value) flushed = value;
    ::close(fds[0]);
    fmt::print("iteration {}: killed after {} of {} writes were flushed\n", iteration, flushed,
               writes.size());

    std::string output;
    ASSERT_EQ(test::shell("qemu-img check -r all " + img, &output), 0) << output;
    ASSERT_EQ(test::shell("qemu-img check " + img, &output), 0) << output;
    std::string raw = dir.file("after.raw");
    ASSERT_EQ(test::shell(fmt::format("qemu-img convert -O raw {} {}", img, raw), &output), 0) << output;
    auto after = test::readFile(raw);
    auto original = test::readFile(base);
    ASSERT_EQ(after.size(), kSize);
    for (uint32_t i = 0; i < flushed; ++i) {
      const Write& w = writes[i];
      ASSERT_TRUE(std::equal(w.data.begin(), w.data.end(), after.begin() + w.offset))
          << "flushed write " << i << " of " << flushed << " lost";
    }
    // Outside the planned ranges every byte still comes from the backing file.
    std::vector<bool> written(kSize, false);
    for (const Write& w : writes) std::fill_n(written.begin() + w.offset, w.data.size(), true);
    for (uint64_t b = 0; b < kSize; ++b) {
      if (!written[b]) {
        ASSERT_EQ(after[b], original[b]) << "byte " << b << " changed";
      }
    }
  }
}

}  // namespace
}  // namespace clonevm::block
