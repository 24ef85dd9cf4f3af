// clone-image-bench: what qcow2 mapping costs next to raw, with QEMU's block layer measured the
// same way in the same run (`qemu-img bench`).
//
//   clone-image-bench DIR [SIZE_MIB]
//
// Makes DIR/bench.raw (random data) and DIR/bench.qcow2 (`qemu-img convert`, 64 KiB clusters,
// fully allocated), then for each: (1) mapRead of random 4 KiB ranges, ns per call; (2) mapWrite
// of random 4 KiB ranges over allocated clusters, ns per call; (3) sequential 4 KiB reads of the
// whole image, map + pread through the page cache; and `qemu-img bench` doing the same reads.
// Results go to docs/BENCHMARKS.md by hand, with the command.

#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "dev-block/image/block_image.h"
#include "dev-block/image/image_io.h"

using namespace clonevm::block;
using Clock = std::chrono::steady_clock;

namespace {

double seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

int shell(const std::string& command) { return std::system(command.c_str()); }

double qemuBench(const std::string& path, const char* format, uint64_t count) {
  std::string command = fmt::format(
      "qemu-img bench -f {} -c {} -d 1 -s 4096 -t writeback {} 2>&1", format, count, path);
  FILE* pipe = ::popen(command.c_str(), "r");
  char line[512];
  double result = -1;
  while (pipe && fgets(line, sizeof line, pipe)) {
    std::sscanf(line, "Run completed in %lf seconds", &result);
  }
  if (pipe) ::pclose(pipe);
  return result;
}

struct Result {
  double mapReadNs, mapWriteNs, seqSeconds;
};

Result measure(const std::string& path, uint64_t size) {
  auto image = openImage({path, ImageFormat::kAuto, false});
  std::mt19937_64 rng(1);
  std::vector<ImageExtent> extents;
  const int calls = 2000000;
  std::vector<uint64_t> offsets(calls);
  for (auto& o : offsets) o = (rng() % (size / 4096)) * 4096;
  auto start = Clock::now();
  for (uint64_t o : offsets) {
    extents.clear();
    image->mapRead(o, 4096, extents);
  }
  Result r{};
  r.mapReadNs = seconds(start) * 1e9 / calls;
  start = Clock::now();
  for (uint64_t o : offsets) {
    extents.clear();
    image->mapWrite(o, 4096, extents);
  }
  r.mapWriteNs = seconds(start) * 1e9 / calls;
  std::vector<uint8_t> buffer(4096);
  start = Clock::now();
  for (uint64_t o = 0; o < size; o += 4096) {
    extents.clear();
    image->mapRead(o, 4096, extents);
    readExtents(extents, buffer.data());
  }
  r.seqSeconds = seconds(start);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: clone-image-bench DIR [SIZE_MIB]\n");
    return 2;
  }
  std::string dir = argv[1];
  uint64_t sizeMiB = argc > 2 ? std::stoull(argv[2]) : 256;
  uint64_t size = sizeMiB << 20;
  std::string raw = dir + "/bench.raw", qcow2 = dir + "/bench.qcow2";
  if (shell(fmt::format("rm -f {0} {1} && head -c {2} /dev/urandom > {0} && "
                        "qemu-img convert -O qcow2 -o cluster_size=64k {0} {1}",
                        raw, qcow2, size)) != 0) {
    std::fprintf(stderr, "could not make the images\n");
    return 1;
  }
  shell(fmt::format("cat {} {} > /dev/null", raw, qcow2));  // both in the page cache
  Result r = measure(raw, size), q = measure(qcow2, size);
  uint64_t count = size / 4096;
  double qemuRaw = qemuBench(raw, "raw", count), qemuQcow2 = qemuBench(qcow2, "qcow2", count);
  fmt::print("image {} MiB, 4 KiB requests\n", sizeMiB);
  fmt::print("{:<34}{:>12}{:>12}{:>10}\n", "", "raw", "qcow2", "qcow2/raw");
  fmt::print("{:<34}{:>12.1f}{:>12.1f}{:>10.2f}\n", "clone mapRead, random (ns/call)", r.mapReadNs,
             q.mapReadNs, q.mapReadNs / r.mapReadNs);
  fmt::print("{:<34}{:>12.1f}{:>12.1f}{:>10.2f}\n", "clone mapWrite, random (ns/call)",
             r.mapWriteNs, q.mapWriteNs, q.mapWriteNs / r.mapWriteNs);
  fmt::print("{:<34}{:>12.3f}{:>12.3f}{:>10.2f}\n", "clone map+pread, sequential (s)",
             r.seqSeconds, q.seqSeconds, q.seqSeconds / r.seqSeconds);
  fmt::print("{:<34}{:>12.3f}{:>12.3f}{:>10.2f}\n", "qemu-img bench, sequential (s)", qemuRaw,
             qemuQcow2, qemuQcow2 / qemuRaw);
  return 0;
}
