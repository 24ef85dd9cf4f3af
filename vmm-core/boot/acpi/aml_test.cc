#include "vmm-core/boot/acpi/aml.h"

#include <gtest/gtest.h>

#include "common/error.h"

namespace clonevm::vmm::aml {
namespace {

Bytes ascii(std::string_view text) { return Bytes(text.begin(), text.end()); }
Bytes join(std::initializer_list<Bytes> parts) {
  Bytes out;
  for (const Bytes& part : parts) out.insert(out.end(), part.begin(), part.end());
  return out;
}

TEST(AmlTest, PkgLengthOneByteForm) {
  EXPECT_EQ(pkgLength(0), (Bytes{0x01}));
  EXPECT_EQ(pkgLength(10), (Bytes{0x0b}));
  EXPECT_EQ(pkgLength(62), (Bytes{0x3f}));  // 63 is the largest one-byte value
}

TEST(AmlTest, PkgLengthTwoByteForm) {
  EXPECT_EQ(pkgLength(63), (Bytes{0x41, 0x04}));  // 63 + 2 = 0x041
  EXPECT_EQ(pkgLength(0xffd), (Bytes{0x4f, 0xff}));  // 0xfff, the largest two-byte value
}

TEST(AmlTest, PkgLengthThreeByteForm) {
  EXPECT_EQ(pkgLength(0xffe), (Bytes{0x81, 0x00, 0x01}));  // 0x1001
  EXPECT_EQ(pkgLength(0xffffc), (Bytes{0x8f, 0xff, 0xff}));  // 0xfffff
}

TEST(AmlTest, PkgLengthFourByteForm) {
  EXPECT_EQ(pkgLength(0xffffd), (Bytes{0xc1, 0x00, 0x00, 0x01}));  // 0x100001
  EXPECT_EQ(pkgLength(0xffffffb), (Bytes{0xcf, 0xff, 0xff, 0xff}));
  EXPECT_THROW(pkgLength(0xffffffc), Error);
}

TEST(AmlTest, IntegersTakeTheShortestForm) {
  EXPECT_EQ(integer(0), (Bytes{0x00}));
  EXPECT_EQ(integer(1), (Bytes{0x01}));
  EXPECT_EQ(integer(2), (Bytes{0x0a, 0x02}));
  EXPECT_EQ(integer(0xff), (Bytes{0x0a, 0xff}));
  EXPECT_EQ(integer(0x100), (Bytes{0x0b, 0x00, 0x01}));
  EXPECT_EQ(integer(0xffff), (Bytes{0x0b, 0xff, 0xff}));
  EXPECT_EQ(integer(0x10000), (Bytes{0x0c, 0x00, 0x00, 0x01, 0x00}));
  EXPECT_EQ(integer(0xffffffff), (Bytes{0x0c, 0xff, 0xff, 0xff, 0xff}));
  EXPECT_EQ(integer(0x100000000), (Bytes{0x0e, 0, 0, 0, 0, 1, 0, 0, 0}));
  EXPECT_EQ(integer(0x1122334455667788),
            (Bytes{0x0e, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11}));
  EXPECT_EQ(dword(5), (Bytes{0x0c, 0x05, 0x00, 0x00, 0x00}));
}

TEST(AmlTest, NameStrings) {
  EXPECT_EQ(nameString("_HID"), ascii("_HID"));
  EXPECT_EQ(nameString("_S5"), ascii("_S5_"));  // short segments are padded with '_'
  EXPECT_EQ(nameString("\\_SB"), ascii("\\_SB_"));
  EXPECT_EQ(nameString("\\_SB.PCI0"), join({{'\\', 0x2e}, ascii("_SB_PCI0")}));
  EXPECT_EQ(nameString("\\_SB.PCI0.COM1"), join({{'\\', 0x2f, 0x03}, ascii("_SB_PCI0COM1")}));
  EXPECT_EQ(nameString("^^PCI0"), ascii("^^PCI0"));
  EXPECT_EQ(nameString("\\"), (Bytes{'\\', 0x00}));
  EXPECT_THROW(nameString("pci0"), Error);   // lower case
  EXPECT_THROW(nameString("PCI00"), Error);  // five characters
  EXPECT_THROW(nameString("0PCI"), Error);   // leading digit
  EXPECT_THROW(nameString("\\_SB..X"), Error);
}

TEST(AmlTest, EisaIdCompression) {
  EXPECT_EQ(eisaIdValue("PNP0A03"), 0x030ad041u);
  EXPECT_EQ(eisaIdValue("PNP0A08"), 0x080ad041u);
  EXPECT_EQ(eisaIdValue("PNP0C02"), 0x020cd041u);
  EXPECT_EQ(eisaIdValue("PNP0501"), 0x0105d041u);
  EXPECT_EQ(eisaId("PNP0A03"), (Bytes{0x0c, 0x41, 0xd0, 0x0a, 0x03}));
  // Always the DWord form, even when the value would fit a Word.
  EXPECT_EQ(eisaId("PNP0000"), (Bytes{0x0c, 0x41, 0xd0, 0x00, 0x00}));
  EXPECT_THROW(eisaIdValue("PNP0A0"), Error);
  EXPECT_THROW(eisaIdValue("pnp0A03"), Error);
  EXPECT_THROW(eisaIdValue("PNP0A0G"), Error);
}

TEST(AmlTest, StringsAndNames) {
  EXPECT_EQ(string("abc"), (Bytes{0x0d, 'a', 'b', 'c', 0x00}));
  EXPECT_EQ(name("_UID", integer(0)), (Bytes{0x08, '_', 'U', 'I', 'D', 0x00}));
  EXPECT_EQ(name("_SEG", integer(0x1234)), (Bytes{0x08, '_', 'S', 'E', 'G', 0x0b, 0x34, 0x12}));
}

TEST(AmlTest, PackageCountsElementsAfterItsLength) {
  EXPECT_EQ(package({integer(5), integer(0)}), (Bytes{0x12, 0x05, 0x02, 0x0a, 0x05, 0x00}));
  EXPECT_EQ(package({}), (Bytes{0x12, 0x02, 0x00}));
}

TEST(AmlTest, ScopeDeviceAndMethod) {
  EXPECT_EQ(scope("\\_SB", {}), join({{0x10, 0x06}, ascii("\\_SB_")}));
  EXPECT_EQ(device("COM1", {name("_UID", integer(1))}),
            join({{0x5b, 0x82, 0x0b}, ascii("COM1"), {0x08}, ascii("_UID"), {0x01}}));
  EXPECT_EQ(method("_PIC", 1, false, {}), join({{0x14, 0x06}, ascii("_PIC"), {0x01}}));
  EXPECT_EQ(method("_STA", 0, true, {returnValue(integer(0x0f))}),
            join({{0x14, 0x09}, ascii("_STA"), {0x08, 0xa4, 0x0a, 0x0f}}));
  EXPECT_EQ(store(arg(0), nameString("PICM")), join({{0x70, 0x68}, ascii("PICM")}));
  EXPECT_EQ(local(7), (Bytes{0x67}));
  EXPECT_THROW(arg(7), Error);
  EXPECT_THROW(method("_X", 8, false, {}), Error);
}

TEST(AmlTest, LargeDeviceUsesMultiBytePkgLength) {
  const Bytes big = buffer(Bytes(100, 0xab));  // 0x11, PkgLength(2), 0x0a 0x64, 100 bytes
  ASSERT_EQ(big.size(), 1 + 2 + 2 + 100u);
  EXPECT_EQ(big[1], 0x40 | (104 & 0xf));  // 102 bytes of contents + 2 of PkgLength
  const Bytes dev = device("BIGD", {name("DATA", big)});
  // ExtOp, DeviceOp, then a two-byte PkgLength covering itself, the name and the body.
  ASSERT_GE(dev.size(), 4u);
  EXPECT_EQ(dev[2] >> 6, 1);
  const size_t encoded = (dev[2] & 0x0f) | (size_t{dev[3]} << 4);
  EXPECT_EQ(encoded, dev.size() - 2);
}

TEST(AmlTest, ResourceDescriptors) {
  ResourceTemplate io;
  io.io(0x3f8, 0x3f8, 1, 8).irqNoFlags(4);
  EXPECT_EQ(io.descriptors(),
            (Bytes{0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08, 0x22, 0x10, 0x00, 0x79, 0x00}));

  ResourceTemplate bus;
  bus.wordBusNumber(0, 0xff);
  EXPECT_EQ(bus.descriptors(), (Bytes{0x88, 0x0d, 0x00, 0x02, 0x0c, 0x00,  // header and flags
                                      0x00, 0x00, 0x00, 0x00, 0xff, 0x00,  // gran, min, max
                                      0x00, 0x00, 0x00, 0x01,              // translation, len
                                      0x79, 0x00}));

  ResourceTemplate mem;
  mem.memory32Fixed(0xe0000000, 0x10000000, true);
  EXPECT_EQ(mem.descriptors(), (Bytes{0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xe0, 0x00,
                                      0x00, 0x00, 0x10, 0x79, 0x00}));

  ResourceTemplate wide;
  wide.dwordMemory(0xc0000000, 0xdfffffff, false).qwordMemory(0x800000000, 0x17ffffffff, true);
  const Bytes d = wide.descriptors();
  ASSERT_EQ(d.size(), 26u + 46u + 2u);
  EXPECT_EQ(d[0], 0x87);
  EXPECT_EQ(d[1], 23);
  EXPECT_EQ(d[5], 0x01) << "DWord: read-write, non-cacheable";
  EXPECT_EQ(d[26], 0x8a);
  EXPECT_EQ(d[27], 43);
  EXPECT_EQ(d[26 + 5], 0x03) << "QWord: read-write, cacheable";
  uint64_t length = 0;
  for (int i = 0; i < 8; ++i) length |= uint64_t{d[26 + 38 + i]} << (8 * i);
  EXPECT_EQ(length, 0x1000000000u);

  // As a Buffer: BufferOp, PkgLength, BufferSize, bytes.
  const Bytes asBuffer = io.build();
  EXPECT_EQ(asBuffer[0], 0x11);
  EXPECT_EQ(asBuffer[2], 0x0a);
  EXPECT_EQ(asBuffer[3], 13);

  ResourceTemplate bad;
  EXPECT_THROW(bad.irqNoFlags(16), Error);
  EXPECT_THROW(bad.wordIo(0x10, 0x0f), Error);
}

}  // namespace
}  // namespace clonevm::vmm::aml
