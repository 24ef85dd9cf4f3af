#pragma once
// Compressed qcow2 clusters: raw deflate (zlib, window 4 KiB as QEMU writes it) or zstd.

#include <cstdint>
#include <vector>

#include "dev-block/image/qcow2_header.h"

namespace clonevm::block {

// Fills `out` (exactly one cluster) from the compressed bytes. The input may carry trailing
// padding (compressed data is stored in whole 512-byte sectors). Throws clonevm::Error when the
// data does not decompress to a full cluster.
void decompressCluster(Qcow2Compression type, const uint8_t* in, size_t inLength,
                       std::vector<uint8_t>& out);

// The inverse, for tests and tools: compresses one cluster.
std::vector<uint8_t> compressCluster(Qcow2Compression type, const std::vector<uint8_t>& in);

}  // namespace clonevm::block
