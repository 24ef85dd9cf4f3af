#pragma once
// Helpers for the image tests: a scratch directory, shell commands, and I/O through a
// BlockImage the way the device does it (map, then read or write the extents).

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "dev-block/image/block_image.h"
#include "dev-block/image/image_io.h"

namespace clonevm::block::test {

class ScratchDir {
 public:
  ScratchDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "clone-image-XXXXXX").string();
    path_ = ::mkdtemp(pattern.data());
  }
  ~ScratchDir() { std::filesystem::remove_all(path_); }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Runs a shell command; returns its exit status and fills `output` with stdout+stderr.
inline int shell(const std::string& command, std::string* output = nullptr) {
  std::string full = command + " 2>&1";
  FILE* pipe = ::popen(full.c_str(), "r");
  if (!pipe) return -1;
  std::string text;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) text.append(buf, n);
  int status = ::pclose(pipe);
  if (output) *output = text;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

inline std::vector<uint8_t> readFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

inline void writeFile(const std::string& path, const std::vector<uint8_t>& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}

inline std::vector<uint8_t> readImage(BlockImage& image, uint64_t offset, uint64_t length) {
  std::vector<ImageExtent> extents;
  image.mapRead(offset, length, extents);
  uint64_t total = 0;
  for (const auto& e : extents) total += e.length;
  EXPECT_EQ(total, length);
  std::vector<uint8_t> data(length);
  readExtents(extents, data.data());
  return data;
}

inline std::vector<uint8_t> readImage(BlockImage& image) {
  return readImage(image, 0, image.virtualSize());
}

inline void writeImage(BlockImage& image, uint64_t offset, const std::vector<uint8_t>& data) {
  std::vector<ImageExtent> extents;
  image.mapWrite(offset, data.size(), extents);
  uint64_t done = 0;
  for (const auto& e : extents) {
    EXPECT_EQ(e.kind, ImageExtent::Kind::kFile);
    pwriteFull(e.fd, data.data() + done, e.length, e.fileOffset, "test");
    done += e.length;
  }
  EXPECT_EQ(done, data.size());
}

inline std::vector<uint8_t> randomBytes(std::mt19937_64& rng, size_t length) {
  std::vector<uint8_t> data(length);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  return data;
}

}  // namespace clonevm::block::test
