#include "vmm-core/boot/acpi/aml.h"

#include "common/error.h"

namespace clonevm::vmm::aml {
namespace {

// Opcodes (ACPI 6.5, 20.3).
constexpr uint8_t kZeroOp = 0x00;
constexpr uint8_t kOneOp = 0x01;
constexpr uint8_t kNameOp = 0x08;
constexpr uint8_t kBytePrefix = 0x0a;
constexpr uint8_t kWordPrefix = 0x0b;
constexpr uint8_t kDWordPrefix = 0x0c;
constexpr uint8_t kStringPrefix = 0x0d;
constexpr uint8_t kQWordPrefix = 0x0e;
constexpr uint8_t kScopeOp = 0x10;
constexpr uint8_t kBufferOp = 0x11;
constexpr uint8_t kPackageOp = 0x12;
constexpr uint8_t kMethodOp = 0x14;
constexpr uint8_t kDualNamePrefix = 0x2e;
constexpr uint8_t kMultiNamePrefix = 0x2f;
constexpr uint8_t kExtOpPrefix = 0x5b;
constexpr uint8_t kDeviceOp = 0x82;  // after kExtOpPrefix
constexpr uint8_t kLocal0Op = 0x60;
constexpr uint8_t kArg0Op = 0x68;
constexpr uint8_t kStoreOp = 0x70;
constexpr uint8_t kReturnOp = 0xa4;
constexpr uint8_t kRootChar = '\\';
constexpr uint8_t kParentPrefixChar = '^';

// Resource descriptor tags (ACPI 6.5, 6.4).
constexpr uint8_t kSmallIrqTag = 0x22;      // type 0x04, 2 bytes of data (no flags byte)
constexpr uint8_t kSmallIoTag = 0x47;       // type 0x08, 7 bytes
constexpr uint8_t kSmallEndTag = 0x79;      // type 0x0f, 1 byte (checksum)
constexpr uint8_t kLargeMemory32Fixed = 0x86;
constexpr uint8_t kLargeDWordAddress = 0x87;
constexpr uint8_t kLargeWordAddress = 0x88;
constexpr uint8_t kLargeQWordAddress = 0x8a;
constexpr uint8_t kResourceTypeMemory = 0;
constexpr uint8_t kResourceTypeIo = 1;
constexpr uint8_t kResourceTypeBus = 2;
// General flags: MinFixed | MaxFixed, positive decode, producer (bit 0 clear).
constexpr uint8_t kProducerFixedWindow = 0x0c;
constexpr uint8_t kIoRangeEntire = 0x03;
constexpr uint8_t kMemoryReadWrite = 0x01;
constexpr uint8_t kMemoryCacheable = 0x02;  // _MEM = 1 (cacheable), bits 2:1
constexpr uint8_t kIoDecode16 = 0x01;

void append(Bytes& out, const Bytes& more) { out.insert(out.end(), more.begin(), more.end()); }

void appendLittleEndian(Bytes& out, uint64_t value, size_t size) {
  for (size_t i = 0; i < size; ++i) out.push_back(static_cast<uint8_t>(value >> (8 * i)));
}

Bytes concat(const std::vector<Bytes>& parts) {
  Bytes out;
  for (const Bytes& part : parts) append(out, part);
  return out;
}

// opcode(s) PkgLength contents
Bytes withPkgLength(Bytes opcode, const Bytes& contents) {
  append(opcode, pkgLength(contents.size()));
  append(opcode, contents);
  return opcode;
}

bool isLeadNameChar(char c) { return (c >= 'A' && c <= 'Z') || c == '_'; }
bool isNameChar(char c) { return isLeadNameChar(c) || (c >= '0' && c <= '9'); }

void appendNameSeg(Bytes& out, std::string_view segment, std::string_view path) {
  require(!segment.empty() && segment.size() <= 4 && isLeadNameChar(segment[0]),
          "invalid AML name segment '{}' in '{}'", segment, path);
  for (size_t i = 0; i < 4; ++i) {
    char c = i < segment.size() ? segment[i] : '_';
    require(isNameChar(c), "invalid character '{}' in AML name '{}'", c, path);
    out.push_back(static_cast<uint8_t>(c));
  }
}

}  // namespace

Bytes pkgLength(size_t contentLength) {
  // The value includes the PkgLength bytes themselves; the lead byte holds 6 bits when alone,
  // otherwise its low nibble and a count of following bytes in bits 7:6.
  if (contentLength + 1 <= 0x3f) return {static_cast<uint8_t>(contentLength + 1)};
  for (size_t extra = 1; extra <= 3; ++extra) {
    const uint64_t total = contentLength + 1 + extra;
    if (total < (uint64_t{1} << (4 + 8 * extra))) {
      Bytes out{static_cast<uint8_t>((extra << 6) | (total & 0x0f))};
      for (size_t i = 0; i < extra; ++i) out.push_back(static_cast<uint8_t>(total >> (4 + 8 * i)));
      return out;
    }
  }
  throw Error(fmt::format("AML package of {} bytes exceeds the 256 MiB PkgLength limit",
                          contentLength));
}

Bytes nameString(std::string_view path) {
  Bytes out;
  std::string_view rest = path;
  if (!rest.empty() && rest.front() == kRootChar) {
    out.push_back(kRootChar);
    rest.remove_prefix(1);
  } else {
    while (!rest.empty() && rest.front() == kParentPrefixChar) {
      out.push_back(kParentPrefixChar);
      rest.remove_prefix(1);
    }
  }
  std::vector<std::string_view> segments;
  while (!rest.empty()) {
    const size_t dot = rest.find('.');
    segments.push_back(rest.substr(0, dot));
    rest = dot == std::string_view::npos ? std::string_view{} : rest.substr(dot + 1);
  }
  if (segments.empty()) {
    out.push_back(kZeroOp);  // NullName
  } else if (segments.size() == 2) {
    out.push_back(kDualNamePrefix);
  } else if (segments.size() > 2) {
    require(segments.size() <= 255, "AML name '{}' has too many segments", path);
    out.push_back(kMultiNamePrefix);
    out.push_back(static_cast<uint8_t>(segments.size()));
  }
  for (std::string_view segment : segments) appendNameSeg(out, segment, path);
  return out;
}

Bytes integer(uint64_t value) {
  if (value == 0) return {kZeroOp};
  if (value == 1) return {kOneOp};
  Bytes out;
  if (value <= 0xff) {
    out.push_back(kBytePrefix);
    appendLittleEndian(out, value, 1);
  } else if (value <= 0xffff) {
    out.push_back(kWordPrefix);
    appendLittleEndian(out, value, 2);
  } else if (value <= 0xffffffff) {
    out.push_back(kDWordPrefix);
    appendLittleEndian(out, value, 4);
  } else {
    out.push_back(kQWordPrefix);
    appendLittleEndian(out, value, 8);
  }
  return out;
}

Bytes dword(uint32_t value) {
  Bytes out{kDWordPrefix};
  appendLittleEndian(out, value, 4);
  return out;
}

Bytes string(std::string_view text) {
  Bytes out{kStringPrefix};
  for (char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    require(byte > 0 && byte < 0x80, "AML strings are 7-bit ASCII without NUL: '{}'", text);
    out.push_back(static_cast<uint8_t>(c));
  }
  out.push_back(0);
  return out;
}

uint32_t eisaIdValue(std::string_view id) {
  auto isUpper = [](char c) { return c >= 'A' && c <= 'Z'; };
  auto hexValue = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  require(id.size() == 7 && isUpper(id[0]) && isUpper(id[1]) && isUpper(id[2]) &&
              hexValue(id[3]) >= 0 && hexValue(id[4]) >= 0 && hexValue(id[5]) >= 0 &&
              hexValue(id[6]) >= 0,
          "invalid EISA id '{}': want three capitals and four hex digits", id);
  // Three 5-bit letters ('A' = 1) then four nibbles, stored most significant byte first.
  const uint32_t vendor = (uint32_t(id[0] - '@') << 10) | (uint32_t(id[1] - '@') << 5) |
                          uint32_t(id[2] - '@');
  const uint32_t product = (uint32_t(hexValue(id[3])) << 12) | (uint32_t(hexValue(id[4])) << 8) |
                           (uint32_t(hexValue(id[5])) << 4) | uint32_t(hexValue(id[6]));
  const uint32_t bigEndian = (vendor << 16) | product;
  return __builtin_bswap32(bigEndian);
}

Bytes eisaId(std::string_view id) { return dword(eisaIdValue(id)); }

Bytes name(std::string_view objectName, const Bytes& object) {
  Bytes out{kNameOp};
  append(out, nameString(objectName));
  append(out, object);
  return out;
}

Bytes scope(std::string_view path, const std::vector<Bytes>& terms) {
  Bytes contents = nameString(path);
  append(contents, concat(terms));
  return withPkgLength({kScopeOp}, contents);
}

Bytes device(std::string_view path, const std::vector<Bytes>& terms) {
  Bytes contents = nameString(path);
  append(contents, concat(terms));
  return withPkgLength({kExtOpPrefix, kDeviceOp}, contents);
}

Bytes method(std::string_view methodName, uint8_t argCount, bool serialized,
             const std::vector<Bytes>& terms) {
  require(argCount <= 7, "AML method {} cannot take {} arguments", methodName, argCount);
  Bytes contents = nameString(methodName);
  contents.push_back(static_cast<uint8_t>(argCount | (serialized ? 0x08 : 0x00)));
  append(contents, concat(terms));
  return withPkgLength({kMethodOp}, contents);
}

Bytes package(const std::vector<Bytes>& elements) {
  require(elements.size() <= 255, "AML Package of {} elements needs VarPackage",
          elements.size());
  Bytes contents{static_cast<uint8_t>(elements.size())};
  append(contents, concat(elements));
  return withPkgLength({kPackageOp}, contents);
}

Bytes buffer(const Bytes& data) {
  Bytes contents = integer(data.size());
  append(contents, data);
  return withPkgLength({kBufferOp}, contents);
}

Bytes store(const Bytes& source, const Bytes& target) {
  Bytes out{kStoreOp};
  append(out, source);
  append(out, target);
  return out;
}

Bytes returnValue(const Bytes& value) {
  Bytes out{kReturnOp};
  append(out, value);
  return out;
}

Bytes arg(uint8_t index) {
  require(index <= 6, "AML has Arg0..Arg6, not Arg{}", index);
  return {static_cast<uint8_t>(kArg0Op + index)};
}

Bytes local(uint8_t index) {
  require(index <= 7, "AML has Local0..Local7, not Local{}", index);
  return {static_cast<uint8_t>(kLocal0Op + index)};
}

void ResourceTemplate::addressSpace(uint8_t tag, uint8_t resourceType, uint8_t typeFlags,
                                    size_t fieldSize, uint64_t min, uint64_t max) {
  require(min <= max, "resource window {:#x}..{:#x} is empty", min, max);
  // Tag, 16-bit length, type, general flags, type flags, then five fields:
  // granularity, minimum, maximum, translation offset, length.
  const size_t length = 3 + 5 * fieldSize;
  bytes_.push_back(tag);
  appendLittleEndian(bytes_, length, 2);
  bytes_.push_back(resourceType);
  bytes_.push_back(kProducerFixedWindow);
  bytes_.push_back(typeFlags);
  appendLittleEndian(bytes_, 0, fieldSize);
  appendLittleEndian(bytes_, min, fieldSize);
  appendLittleEndian(bytes_, max, fieldSize);
  appendLittleEndian(bytes_, 0, fieldSize);
  appendLittleEndian(bytes_, max - min + 1, fieldSize);
}

ResourceTemplate& ResourceTemplate::wordBusNumber(uint16_t min, uint16_t max) {
  addressSpace(kLargeWordAddress, kResourceTypeBus, 0, 2, min, max);
  return *this;
}

ResourceTemplate& ResourceTemplate::wordIo(uint16_t min, uint16_t max) {
  addressSpace(kLargeWordAddress, kResourceTypeIo, kIoRangeEntire, 2, min, max);
  return *this;
}

ResourceTemplate& ResourceTemplate::dwordMemory(uint32_t min, uint32_t max, bool cacheable) {
  addressSpace(kLargeDWordAddress, kResourceTypeMemory,
               kMemoryReadWrite | (cacheable ? kMemoryCacheable : 0), 4, min, max);
  return *this;
}

ResourceTemplate& ResourceTemplate::qwordMemory(uint64_t min, uint64_t max, bool cacheable) {
  require(max - min + 1 != 0, "QWordMemory window {:#x}..{:#x} is too large", min, max);
  addressSpace(kLargeQWordAddress, kResourceTypeMemory,
               kMemoryReadWrite | (cacheable ? kMemoryCacheable : 0), 8, min, max);
  return *this;
}

ResourceTemplate& ResourceTemplate::io(uint16_t min, uint16_t max, uint8_t alignment,
                                       uint8_t length) {
  bytes_.push_back(kSmallIoTag);
  bytes_.push_back(kIoDecode16);
  appendLittleEndian(bytes_, min, 2);
  appendLittleEndian(bytes_, max, 2);
  bytes_.push_back(alignment);
  bytes_.push_back(length);
  return *this;
}

ResourceTemplate& ResourceTemplate::irqNoFlags(uint8_t irq) {
  require(irq < 16, "IRQNoFlags takes ISA IRQs 0..15, not {}", irq);
  bytes_.push_back(kSmallIrqTag);
  appendLittleEndian(bytes_, 1u << irq, 2);
  return *this;
}

ResourceTemplate& ResourceTemplate::memory32Fixed(uint32_t base, uint32_t length,
                                                  bool writable) {
  bytes_.push_back(kLargeMemory32Fixed);
  appendLittleEndian(bytes_, 9, 2);
  bytes_.push_back(writable ? 1 : 0);
  appendLittleEndian(bytes_, base, 4);
  appendLittleEndian(bytes_, length, 4);
  return *this;
}

Bytes ResourceTemplate::descriptors() const {
  Bytes out = bytes_;
  out.push_back(kSmallEndTag);
  // A zero checksum means "treat as valid" (ACPI 6.4.2.9); ASL compilers emit 0 too, which keeps
  // our bytes identical to iasl's for the same ASL.
  out.push_back(0);
  return out;
}

Bytes ResourceTemplate::build() const { return buffer(descriptors()); }

}  // namespace clonevm::vmm::aml
