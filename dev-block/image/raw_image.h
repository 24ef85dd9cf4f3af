#pragma once
// Raw images: the guest's bytes are the file's bytes. Mapping is the identity.

#include <memory>
#include <string>

#include "common/unique_fd.h"
#include "dev-block/image/block_image.h"

namespace clonevm::block {

class RawImage final : public BlockImage {
 public:
  static std::unique_ptr<RawImage> open(const std::string& path, bool readOnly);
  RawImage(UniqueFd fd, std::string path, uint64_t size, bool readOnly);

  uint64_t virtualSize() const override { return size_; }
  bool readOnly() const override { return readOnly_; }
  uint32_t clusterSize() const override { return 4096; }
  std::string describe() const override;

  void mapRead(uint64_t offset, uint64_t length, std::vector<ImageExtent>& out) override;
  void mapWrite(uint64_t offset, uint64_t length, std::vector<ImageExtent>& out) override;
  void flush() override;
  void discard(uint64_t offset, uint64_t length) override;
  void writeZeroes(uint64_t offset, uint64_t length, bool mayUnmap) override;

 private:
  UniqueFd fd_;
  std::string path_;
  uint64_t size_;
  bool readOnly_;
};

}  // namespace clonevm::block
