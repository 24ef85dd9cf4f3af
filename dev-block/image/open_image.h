#pragma once
// Format probing and opening of whole backing chains (see openImage() in block_image.h).

#include <string>

#include "dev-block/image/block_image.h"

namespace clonevm::block {

// Backing chains deeper than this are refused (they are almost always a loop or a mistake).
inline constexpr int kMaxBackingChainDepth = 64;

// kQcow2 when the file starts with the qcow2 magic, else kRaw.
ImageFormat probeImageFormat(const std::string& path);
// "raw", "qcow2" -> the format; "" -> kAuto; anything else is refused.
ImageFormat parseImageFormat(const std::string& name);
const char* imageFormatName(ImageFormat format);

}  // namespace clonevm::block
