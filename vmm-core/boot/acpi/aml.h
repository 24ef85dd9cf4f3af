#pragma once
// A small builder for AML, the bytecode of ACPI definition blocks (ACPI 6.5, chapter 20), and for
// the resource descriptors (chapter 6.4) that _CRS returns. Each function returns the encoded
// bytes of one term, so a DSDT is written as nested calls mirroring its ASL.

#include <cstdint>
#include <string_view>
#include <vector>

namespace clonevm::vmm::aml {

using Bytes = std::vector<uint8_t>;

// PkgLength for a package whose contents after the PkgLength are `contentLength` bytes long.
// The encoded value counts its own 1..4 bytes, as the spec requires.
Bytes pkgLength(size_t contentLength);

// A NameString: an optional root ("\") or parent ("^") prefix, then dot-separated segments of up
// to four characters (padded with '_'): "\\_SB.PCI0", "_HID", "_S5".
Bytes nameString(std::string_view path);

// The shortest integer encoding: ZeroOp, OneOp, or Byte/Word/DWord/QWord prefix.
Bytes integer(uint64_t value);
// An integer that always takes the DWord form (what ASL compilers emit for EisaId).
Bytes dword(uint32_t value);
// A NUL-terminated ASCII string.
Bytes string(std::string_view text);

// Compresses a 7-character EISA id such as "PNP0A08" into its 32-bit AML value.
uint32_t eisaIdValue(std::string_view id);
// EisaId("PNP0A08") as ASL writes it: a DWord integer.
Bytes eisaId(std::string_view id);

// Name(name, object)
Bytes name(std::string_view name, const Bytes& object);
// Scope(path) { terms }
Bytes scope(std::string_view path, const std::vector<Bytes>& terms);
// Device(path) { terms }
Bytes device(std::string_view path, const std::vector<Bytes>& terms);
// Method(name, argCount, Serialized/NotSerialized) { terms }
Bytes method(std::string_view name, uint8_t argCount, bool serialized,
             const std::vector<Bytes>& terms);
// Package() { elements }
Bytes package(const std::vector<Bytes>& elements);
// Buffer() { bytes }
Bytes buffer(const Bytes& contents);
// Store(source, target)
Bytes store(const Bytes& source, const Bytes& target);
// Return(value)
Bytes returnValue(const Bytes& value);
// ArgN (0..6) and LocalN (0..7)
Bytes arg(uint8_t index);
Bytes local(uint8_t index);

// Resource descriptors for a ResourceTemplate (a Buffer ending in an End Tag).
class ResourceTemplate {
 public:
  // Windows a bridge produces (Min and Max fixed, positive decode).
  ResourceTemplate& wordBusNumber(uint16_t min, uint16_t max);
  ResourceTemplate& wordIo(uint16_t min, uint16_t max);
  ResourceTemplate& dwordMemory(uint32_t min, uint32_t max, bool cacheable);
  ResourceTemplate& qwordMemory(uint64_t min, uint64_t max, bool cacheable);
  // Resources a device consumes.
  ResourceTemplate& io(uint16_t min, uint16_t max, uint8_t alignment, uint8_t length);
  ResourceTemplate& irqNoFlags(uint8_t irq);
  ResourceTemplate& memory32Fixed(uint32_t base, uint32_t length, bool writable);

  // The descriptors plus End Tag, without the Buffer wrapper.
  Bytes descriptors() const;
  // The Buffer object holding them, ready for Name(_CRS, ...).
  Bytes build() const;

 private:
  void addressSpace(uint8_t tag, uint8_t resourceType, uint8_t typeFlags, size_t fieldSize,
                    uint64_t min, uint64_t max);
  Bytes bytes_;
};

}  // namespace clonevm::vmm::aml
