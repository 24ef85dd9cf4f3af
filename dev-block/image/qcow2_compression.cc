#include "dev-block/image/qcow2_compression.h"

#include <zlib.h>
#include <zstd.h>

#include <memory>

#include "common/error.h"

namespace clonevm::block {

namespace {

constexpr int kDeflateWindowBits = -12;  // raw deflate, 4 KiB window (QEMU's choice)

void inflateRaw(const uint8_t* in, size_t inLength, std::vector<uint8_t>& out) {
  z_stream stream{};
  require(inflateInit2(&stream, kDeflateWindowBits) == Z_OK, "zlib: inflateInit2 failed");
  stream.next_in = const_cast<Bytef*>(in);
  stream.avail_in = static_cast<uInt>(inLength);
  stream.next_out = out.data();
  stream.avail_out = static_cast<uInt>(out.size());
  int rc = inflate(&stream, Z_FINISH);
  bool full = stream.avail_out == 0;
  inflateEnd(&stream);
  require((rc == Z_STREAM_END || rc == Z_BUF_ERROR) && full,
          "compressed cluster is corrupt (zlib inflate returned {}, {} bytes missing)", rc,
          stream.avail_out);
}

void decompressZstd(const uint8_t* in, size_t inLength, std::vector<uint8_t>& out) {
  std::unique_ptr<ZSTD_DCtx, decltype(&ZSTD_freeDCtx)> ctx(ZSTD_createDCtx(), ZSTD_freeDCtx);
  require(ctx != nullptr, "zstd: cannot create a decompression context");
  ZSTD_inBuffer input{in, inLength, 0};
  ZSTD_outBuffer output{out.data(), out.size(), 0};
  while (output.pos < output.size) {
    size_t before = output.pos;
    size_t rc = ZSTD_decompressStream(ctx.get(), &output, &input);
    require(!ZSTD_isError(rc), "compressed cluster is corrupt (zstd: {})", ZSTD_getErrorName(rc));
    require(output.pos > before || input.pos < input.size,
            "compressed cluster is corrupt (zstd data ends {} bytes short)",
            output.size - output.pos);
    if (output.pos == before && input.pos == input.size) break;
  }
  require(output.pos == output.size, "compressed cluster is corrupt (zstd data ends early)");
}

}  // namespace

void decompressCluster(Qcow2Compression type, const uint8_t* in, size_t inLength,
                       std::vector<uint8_t>& out) {
  switch (type) {
    case Qcow2Compression::kZlib: return inflateRaw(in, inLength, out);
    case Qcow2Compression::kZstd: return decompressZstd(in, inLength, out);
  }
  throw Error("unknown qcow2 compression type");
}

std::vector<uint8_t> compressCluster(Qcow2Compression type, const std::vector<uint8_t>& in) {
  if (type == Qcow2Compression::kZstd) {
    std::vector<uint8_t> out(ZSTD_compressBound(in.size()));
    size_t n = ZSTD_compress(out.data(), out.size(), in.data(), in.size(), 3);
    require(!ZSTD_isError(n), "zstd compression failed: {}", ZSTD_getErrorName(n));
    out.resize(n);
    return out;
  }
  z_stream stream{};
  require(deflateInit2(&stream, Z_DEFAULT_COMPRESSION, Z_DEFLATED, kDeflateWindowBits, 9,
                       Z_DEFAULT_STRATEGY) == Z_OK,
          "zlib: deflateInit2 failed");
  std::vector<uint8_t> out(deflateBound(&stream, in.size()));
  stream.next_in = const_cast<Bytef*>(in.data());
  stream.avail_in = static_cast<uInt>(in.size());
  stream.next_out = out.data();
  stream.avail_out = static_cast<uInt>(out.size());
  int rc = deflate(&stream, Z_FINISH);
  out.resize(out.size() - stream.avail_out);
  deflateEnd(&stream);
  require(rc == Z_STREAM_END, "zlib compression failed ({})", rc);
  return out;
}

}  // namespace clonevm::block
