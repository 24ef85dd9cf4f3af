#include "vmm-core/boot/acpi/acpi_tables.h"

#include <cstddef>
#include <cstring>
#include <numeric>

#include "common/error.h"
#include "vmm-core/boot/acpi/aml.h"

namespace clonevm::vmm {
namespace {

// ---- Table layouts (ACPI 6.5, chapter 5.2). Packed: these are byte-exact wire formats. ----

#pragma pack(push, 1)
struct TableHeader {
  char signature[4];
  uint32_t length;
  uint8_t revision;
  uint8_t checksum;
  char oemId[6];
  char oemTableId[8];
  uint32_t oemRevision;
  char creatorId[4];
  uint32_t creatorRevision;
};
static_assert(sizeof(TableHeader) == 36);

struct GenericAddress {
  uint8_t spaceId;
  uint8_t bitWidth;
  uint8_t bitOffset;
  uint8_t accessSize;
  uint64_t address;
};
static_assert(sizeof(GenericAddress) == 12);

struct Rsdp {
  char signature[8];
  uint8_t checksum;  // over the first 20 bytes (the ACPI 1.0 part)
  char oemId[6];
  uint8_t revision;
  uint32_t rsdtAddress;
  uint32_t length;
  uint64_t xsdtAddress;
  uint8_t extendedChecksum;  // over all 36 bytes
  uint8_t reserved[3];
};
static_assert(sizeof(Rsdp) == 36);

struct Fadt {
  TableHeader header;
  uint32_t firmwareCtrl;
  uint32_t dsdt;
  uint8_t reserved0;
  uint8_t preferredPmProfile;
  uint16_t sciInt;
  uint32_t smiCmd;
  uint8_t acpiEnable;
  uint8_t acpiDisable;
  uint8_t s4biosReq;
  uint8_t pstateCnt;
  uint32_t pm1aEvtBlk;
  uint32_t pm1bEvtBlk;
  uint32_t pm1aCntBlk;
  uint32_t pm1bCntBlk;
  uint32_t pm2CntBlk;
  uint32_t pmTmrBlk;
  uint32_t gpe0Blk;
  uint32_t gpe1Blk;
  uint8_t pm1EvtLen;
  uint8_t pm1CntLen;
  uint8_t pm2CntLen;
  uint8_t pmTmrLen;
  uint8_t gpe0BlkLen;
  uint8_t gpe1BlkLen;
  uint8_t gpe1Base;
  uint8_t cstCnt;
  uint16_t pLvl2Lat;
  uint16_t pLvl3Lat;
  uint16_t flushSize;
  uint16_t flushStride;
  uint8_t dutyOffset;
  uint8_t dutyWidth;
  uint8_t dayAlrm;
  uint8_t monAlrm;
  uint8_t century;
  uint16_t iapcBootArch;
  uint8_t reserved1;
  uint32_t flags;
  GenericAddress resetReg;
  uint8_t resetValue;
  uint16_t armBootArch;
  uint8_t fadtMinorVersion;
  uint64_t xFirmwareCtrl;
  uint64_t xDsdt;
  GenericAddress xPm1aEvtBlk;
  GenericAddress xPm1bEvtBlk;
  GenericAddress xPm1aCntBlk;
  GenericAddress xPm1bCntBlk;
  GenericAddress xPm2CntBlk;
  GenericAddress xPmTmrBlk;
  GenericAddress xGpe0Blk;
  GenericAddress xGpe1Blk;
  GenericAddress sleepControlReg;
  GenericAddress sleepStatusReg;
  uint64_t hypervisorVendorIdentity;
};
static_assert(sizeof(Fadt) == 276);
static_assert(offsetof(Fadt, sciInt) == 46);
static_assert(offsetof(Fadt, pm1aEvtBlk) == 56);
static_assert(offsetof(Fadt, pmTmrBlk) == 76);
static_assert(offsetof(Fadt, pm1EvtLen) == 88);
static_assert(offsetof(Fadt, iapcBootArch) == 109);
static_assert(offsetof(Fadt, flags) == 112);
static_assert(offsetof(Fadt, resetReg) == 116);
static_assert(offsetof(Fadt, resetValue) == 128);
static_assert(offsetof(Fadt, fadtMinorVersion) == 131);
static_assert(offsetof(Fadt, xDsdt) == 140);
static_assert(offsetof(Fadt, xPm1aEvtBlk) == 148);
static_assert(offsetof(Fadt, xPmTmrBlk) == 208);
static_assert(offsetof(Fadt, sleepControlReg) == 244);
static_assert(offsetof(Fadt, hypervisorVendorIdentity) == 268);

struct Facs {
  char signature[4];
  uint32_t length;
  uint32_t hardwareSignature;
  uint32_t firmwareWakingVector;
  uint32_t globalLock;
  uint32_t flags;
  uint64_t xFirmwareWakingVector;
  uint8_t version;
  uint8_t reserved0[3];
  uint32_t ospmFlags;
  uint8_t reserved1[24];
};
static_assert(sizeof(Facs) == 64);

struct MadtHeader {
  TableHeader header;
  uint32_t localApicAddress;
  uint32_t flags;
};
static_assert(sizeof(MadtHeader) == 44);

struct MadtLocalApic {
  uint8_t type;
  uint8_t length;
  uint8_t processorUid;
  uint8_t apicId;
  uint32_t flags;
};
static_assert(sizeof(MadtLocalApic) == 8);

struct MadtIoApic {
  uint8_t type;
  uint8_t length;
  uint8_t ioApicId;
  uint8_t reserved;
  uint32_t address;
  uint32_t gsiBase;
};
static_assert(sizeof(MadtIoApic) == 12);

struct MadtInterruptOverride {
  uint8_t type;
  uint8_t length;
  uint8_t bus;
  uint8_t source;
  uint32_t gsi;
  uint16_t flags;
};
static_assert(sizeof(MadtInterruptOverride) == 10);

struct MadtLocalApicNmi {
  uint8_t type;
  uint8_t length;
  uint8_t processorUid;
  uint16_t flags;
  uint8_t lint;
};
static_assert(sizeof(MadtLocalApicNmi) == 6);

struct McfgAllocation {
  uint64_t baseAddress;
  uint16_t segment;
  uint8_t startBus;
  uint8_t endBus;
  uint32_t reserved;
};
static_assert(sizeof(McfgAllocation) == 16);
#pragma pack(pop)

// ---- Values ----

constexpr char kOemId[] = "CLONE ";
constexpr char kOemTableId[] = "CLONEVM ";
constexpr char kCreatorId[] = "CLNE";
constexpr uint32_t kOemRevision = 1;
constexpr uint32_t kCreatorRevision = 1;

constexpr uint8_t kRsdpRevision = 2;       // ACPI 2.0+: has the XSDT
constexpr uint8_t kXsdtRevision = 1;
constexpr uint8_t kFadtRevision = 6;       // ACPI 6.x layout, 276 bytes
constexpr uint8_t kFadtMinorVersion = 0;
constexpr uint8_t kDsdtRevision = 2;       // 2+: AML integers are 64-bit
constexpr uint8_t kMadtRevision = 4;
constexpr uint8_t kMcfgRevision = 1;
constexpr uint8_t kFacsVersion = 2;

constexpr uint8_t kAddressSpaceSystemIo = 1;
constexpr uint8_t kAccessByte = 1;
constexpr uint8_t kAccessWord = 2;
constexpr uint8_t kAccessDword = 3;

constexpr uint8_t kPm1EventLength = 4;
constexpr uint8_t kPm1ControlLength = 2;
constexpr uint8_t kPmTimerLength = 4;
constexpr uint16_t kC2Unsupported = 101;   // latency > 100 us means "no C2"
constexpr uint16_t kC3Unsupported = 1001;  // latency > 1000 us means "no C3"

// FADT flags.
constexpr uint32_t kFadtWbinvd = 1u << 0;
constexpr uint32_t kFadtProcC1 = 1u << 2;
constexpr uint32_t kFadtPowerButtonIsControlMethod = 1u << 4;  // i.e. no fixed power button
constexpr uint32_t kFadtSleepButtonIsControlMethod = 1u << 5;
constexpr uint32_t kFadtNoRtcWakeStatus = 1u << 6;             // FIX_RTC
constexpr uint32_t kFadtTimerValueExtended = 1u << 8;          // 32-bit PM timer
constexpr uint32_t kFadtResetRegSupported = 1u << 10;

// IA-PC boot architecture flags.
constexpr uint16_t kBootArchLegacyDevices = 1u << 0;
constexpr uint16_t kBootArch8042 = 1u << 1;
constexpr uint16_t kBootArchNoVga = 1u << 2;

// MADT.
constexpr uint32_t kMadtPcAtCompat = 1u << 0;  // dual 8259 present (KVM's in-kernel PIC)
constexpr uint8_t kMadtTypeLocalApic = 0;
constexpr uint8_t kMadtTypeIoApic = 1;
constexpr uint8_t kMadtTypeInterruptOverride = 2;
constexpr uint8_t kMadtTypeLocalApicNmi = 4;
constexpr uint32_t kLocalApicEnabled = 1u << 0;
constexpr uint8_t kIoApicId = 0;  // KVM's in-kernel IOAPIC resets to id 0
constexpr uint16_t kMpsIntiActiveHigh = 0x1;
constexpr uint16_t kMpsIntiLevelTriggered = 0x3 << 2;
constexpr uint8_t kAllProcessors = 0xff;
constexpr uint8_t kTimerIsaIrq = 0;
constexpr uint32_t kTimerGsi = 2;

constexpr uint64_t kTableAlignment = 16;
constexpr uint64_t kFacsAlignment = 64;

template <size_t N>
void setChars(char (&field)[N], const char (&text)[N + 1]) {
  std::memcpy(field, text, N);
}

TableHeader makeHeader(const char (&signature)[5], uint32_t length, uint8_t revision) {
  TableHeader header{};
  setChars(header.signature, signature);
  header.length = length;
  header.revision = revision;
  setChars(header.oemId, kOemId);
  setChars(header.oemTableId, kOemTableId);
  header.oemRevision = kOemRevision;
  setChars(header.creatorId, kCreatorId);
  header.creatorRevision = kCreatorRevision;
  return header;
}

template <typename T>
void appendObject(std::vector<uint8_t>& out, const T& value) {
  const auto* bytes = reinterpret_cast<const uint8_t*>(&value);
  out.insert(out.end(), bytes, bytes + sizeof(T));
}

// Writes the final length into the header and makes the table sum to zero.
std::vector<uint8_t> sealTable(std::vector<uint8_t> table) {
  const uint32_t length = static_cast<uint32_t>(table.size());
  std::memcpy(table.data() + offsetof(TableHeader, length), &length, sizeof(length));
  table[offsetof(TableHeader, checksum)] = 0;
  table[offsetof(TableHeader, checksum)] = static_cast<uint8_t>(-acpiChecksum(table));
  return table;
}

template <typename T>
std::vector<uint8_t> bytesOf(const T& value) {
  std::vector<uint8_t> out;
  appendObject(out, value);
  return out;
}

GenericAddress systemIo(uint16_t port, uint8_t lengthBytes, uint8_t accessSize) {
  return {kAddressSpaceSystemIo, static_cast<uint8_t>(lengthBytes * 8), 0, accessSize, port};
}

std::vector<uint8_t> buildFadt(uint64_t dsdtAddress, uint64_t facsAddress) {
  Fadt fadt{};
  fadt.header = makeHeader("FACP", sizeof(Fadt), kFadtRevision);
  fadt.firmwareCtrl = static_cast<uint32_t>(facsAddress);
  fadt.dsdt = static_cast<uint32_t>(dsdtAddress);
  fadt.sciInt = layout::kSciIrq;
  fadt.smiCmd = 0;  // no SMI command port: the machine is always in ACPI mode
  fadt.pm1aEvtBlk = layout::kPm1aEventPort;
  fadt.pm1aCntBlk = layout::kPm1aControlPort;
  fadt.pmTmrBlk = layout::kPmTimerPort;
  fadt.pm1EvtLen = kPm1EventLength;
  fadt.pm1CntLen = kPm1ControlLength;
  fadt.pmTmrLen = kPmTimerLength;
  fadt.pLvl2Lat = kC2Unsupported;
  fadt.pLvl3Lat = kC3Unsupported;
  fadt.century = 0x32;  // the CMOS century register (devices/cmos.h)
  fadt.iapcBootArch = kBootArchLegacyDevices | kBootArch8042 | kBootArchNoVga;
  // A fixed-feature power button (AcpiPm::pressPowerButton): `clone shutdown` presses it.
  fadt.flags = kFadtWbinvd | kFadtProcC1 | kFadtSleepButtonIsControlMethod | kFadtNoRtcWakeStatus | kFadtTimerValueExtended |
               kFadtResetRegSupported;
  fadt.resetReg = systemIo(layout::kResetPort, 1, kAccessByte);
  fadt.resetValue = layout::kResetValue;
  fadt.fadtMinorVersion = kFadtMinorVersion;
  // FACS below 4 GiB: only the 32-bit pointer. With both set, ACPICA installs the FACS twice.
  fadt.xFirmwareCtrl = 0;
  fadt.xDsdt = dsdtAddress;
  // The X_ blocks repeat the 32-bit ones exactly; ACPICA warns on any address/width mismatch.
  fadt.xPm1aEvtBlk = systemIo(layout::kPm1aEventPort, kPm1EventLength, kAccessWord);
  fadt.xPm1aCntBlk = systemIo(layout::kPm1aControlPort, kPm1ControlLength, kAccessWord);
  fadt.xPmTmrBlk = systemIo(layout::kPmTimerPort, kPmTimerLength, kAccessDword);
  std::memcpy(&fadt.hypervisorVendorIdentity, kOemTableId, sizeof(uint64_t));
  return sealTable(bytesOf(fadt));
}

std::vector<uint8_t> buildFacs() {
  Facs facs{};
  std::memcpy(facs.signature, "FACS", 4);
  facs.length = sizeof(Facs);
  facs.version = kFacsVersion;
  return bytesOf(facs);  // the FACS has no checksum
}

std::vector<uint8_t> buildMadt(const AcpiConfig& config) {
  std::vector<uint8_t> table;
  MadtHeader header{};
  header.header = makeHeader("APIC", 0, kMadtRevision);
  header.localApicAddress = static_cast<uint32_t>(layout::kLapicAddr);
  header.flags = kMadtPcAtCompat;
  appendObject(table, header);

  for (uint32_t cpu = 0; cpu < config.vcpuCount; ++cpu) {
    appendObject(table, MadtLocalApic{kMadtTypeLocalApic, sizeof(MadtLocalApic),
                                      static_cast<uint8_t>(cpu), static_cast<uint8_t>(cpu),
                                      kLocalApicEnabled});
  }
  appendObject(table, MadtIoApic{kMadtTypeIoApic, sizeof(MadtIoApic), kIoApicId, 0,
                                 static_cast<uint32_t>(layout::kIoapicAddr), 0});
  // The PIT's IRQ0 is wired to IOAPIC pin 2, as on every PC.
  appendObject(table, MadtInterruptOverride{kMadtTypeInterruptOverride,
                                            sizeof(MadtInterruptOverride), 0, kTimerIsaIrq,
                                            kTimerGsi, 0});
  // The SCI is level-triggered, active high (ACPI's default for ISA IRQ9 is active low).
  appendObject(table, MadtInterruptOverride{kMadtTypeInterruptOverride,
                                            sizeof(MadtInterruptOverride), 0, layout::kSciIrq,
                                            layout::kSciIrq,
                                            kMpsIntiActiveHigh | kMpsIntiLevelTriggered});
  appendObject(table, MadtLocalApicNmi{kMadtTypeLocalApicNmi, sizeof(MadtLocalApicNmi),
                                       kAllProcessors, 0, 1});
  return sealTable(std::move(table));
}

std::vector<uint8_t> buildMcfg() {
  std::vector<uint8_t> table;
  appendObject(table, makeHeader("MCFG", 0, kMcfgRevision));
  appendObject(table, uint64_t{0});  // reserved
  appendObject(table, McfgAllocation{layout::kEcamStart, 0, 0, 255, 0});
  return sealTable(std::move(table));
}

std::vector<uint8_t> buildXsdt(const std::vector<uint64_t>& tableAddresses) {
  std::vector<uint8_t> table;
  appendObject(table, makeHeader("XSDT", 0, kXsdtRevision));
  for (uint64_t address : tableAddresses) appendObject(table, address);
  return sealTable(std::move(table));
}

std::vector<uint8_t> buildRsdp(uint64_t xsdtAddress) {
  Rsdp rsdp{};
  std::memcpy(rsdp.signature, "RSD PTR ", 8);
  setChars(rsdp.oemId, kOemId);
  rsdp.revision = kRsdpRevision;
  rsdp.rsdtAddress = 0;  // no RSDT: every OS we boot reads the XSDT
  rsdp.length = sizeof(Rsdp);
  rsdp.xsdtAddress = xsdtAddress;
  std::vector<uint8_t> bytes = bytesOf(rsdp);
  bytes[offsetof(Rsdp, checksum)] = static_cast<uint8_t>(-acpiChecksum(bytes, 0, 20));
  bytes[offsetof(Rsdp, extendedChecksum)] = static_cast<uint8_t>(-acpiChecksum(bytes));
  return bytes;
}

void validate(const AcpiConfig& config) {
  require(config.vcpuCount >= 1 && config.vcpuCount <= kAcpiMaxVcpus,
          "ACPI tables support 1..{} vCPUs, not {}", kAcpiMaxVcpus, config.vcpuCount);
  if (config.pciMmio64Size != 0) {
    require(config.pciMmio64Start >= layout::kHighRamStart,
            "the 64-bit PCI window must start at or above 4 GiB, not {:#x}",
            config.pciMmio64Start);
    require(config.pciMmio64Start + config.pciMmio64Size > config.pciMmio64Start,
            "the 64-bit PCI window {:#x}+{:#x} wraps around", config.pciMmio64Start,
            config.pciMmio64Size);
  }
}

class TableAllocator {
 public:
  explicit TableAllocator(uint64_t start) : next_(start) {}
  uint64_t allocate(uint64_t size, uint64_t alignment) {
    const uint64_t address = (next_ + alignment - 1) & ~(alignment - 1);
    next_ = address + size;
    return address;
  }
  uint64_t next() const { return next_; }

 private:
  uint64_t next_;
};

}  // namespace

uint8_t acpiChecksum(const std::vector<uint8_t>& bytes, size_t offset, size_t length) {
  const size_t end = length == SIZE_MAX ? bytes.size() : offset + length;
  require(offset <= end && end <= bytes.size(), "checksum range {}+{} is outside {} bytes",
          offset, length, bytes.size());
  return std::accumulate(bytes.begin() + static_cast<ptrdiff_t>(offset),
                         bytes.begin() + static_cast<ptrdiff_t>(end), uint8_t{0},
                         [](uint8_t sum, uint8_t b) { return static_cast<uint8_t>(sum + b); });
}

std::vector<uint8_t> buildDsdt(const AcpiConfig& config) {
  validate(config);
  using namespace aml;

  ResourceTemplate rootBridge;
  rootBridge.wordBusNumber(0x00, 0xff)
      .io(layout::kPciConfigAddressPort, layout::kPciConfigAddressPort, 1, 8)
      .wordIo(0x0000, layout::kPciConfigAddressPort - 1)
      .wordIo(0x0d00, 0xffff)
      .dwordMemory(static_cast<uint32_t>(layout::kPciMmio32Start),
                   static_cast<uint32_t>(layout::kPciMmio32Start + layout::kPciMmio32Size - 1),
                   /*cacheable=*/false);
  if (config.pciMmio64Size != 0) {
    rootBridge.qwordMemory(config.pciMmio64Start,
                           config.pciMmio64Start + config.pciMmio64Size - 1, /*cacheable=*/true);
  }

  ResourceTemplate motherboard;
  motherboard.memory32Fixed(static_cast<uint32_t>(layout::kEcamStart),
                            static_cast<uint32_t>(layout::kEcamSize), /*writable=*/true);

  ResourceTemplate com1;
  com1.io(layout::kCom1Port, layout::kCom1Port, 1, 8).irqNoFlags(layout::kCom1Irq);

  std::vector<uint8_t> body;
  auto add = [&body](const Bytes& term) { body.insert(body.end(), term.begin(), term.end()); };
  // \_S5: {SLP_TYPa, SLP_TYPb, reserved, reserved}; SLP_TYPa goes to PM1a_CNT.SLP_TYP.
  add(name("\\_S5", package({integer(layout::kS5SleepType), integer(0), integer(0), integer(0)})));
  // _PIC(mode): the OS says PIC or APIC mode; we only remember it (no _PRT depends on it).
  add(name("\\PICM", integer(0)));
  add(method("\\_PIC", 1, /*serialized=*/false, {store(arg(0), nameString("\\PICM"))}));
  add(scope("\\_SB",
            {
                device("PCI0",
                       {
                           name("_HID", eisaId("PNP0A08")),
                           name("_CID", eisaId("PNP0A03")),
                           name("_SEG", integer(0)),
                           name("_BBN", integer(0)),
                           name("_UID", integer(0)),
                           name("_CRS", rootBridge.build()),
                       }),
                // Reserves the ECAM window: Linux uses MMCONFIG only if firmware claims it.
                device("MBRD",
                       {
                           name("_HID", eisaId("PNP0C02")),
                           name("_UID", integer(0)),
                           name("_CRS", motherboard.build()),
                       }),
                device("COM1",
                       {
                           name("_HID", eisaId("PNP0501")),
                           name("_UID", integer(1)),
                           name("_CRS", com1.build()),
                       }),
            }));

  std::vector<uint8_t> table;
  appendObject(table, makeHeader("DSDT", 0, kDsdtRevision));
  table.insert(table.end(), body.begin(), body.end());
  return sealTable(std::move(table));
}

AcpiTables buildAcpiTables(const AcpiConfig& config) {
  validate(config);
  TableAllocator allocator(layout::kAcpiTablesAddr);
  // The RSDP first, 16-byte aligned: the legacy scan of 0xE0000..0xFFFFF finds it there.
  const uint64_t rsdpAddress = allocator.allocate(sizeof(Rsdp), kTableAlignment);
  constexpr size_t kXsdtEntries = 3;  // FADT, MADT, MCFG (DSDT and FACS hang off the FADT)
  const uint64_t xsdtAddress =
      allocator.allocate(sizeof(TableHeader) + kXsdtEntries * sizeof(uint64_t), kTableAlignment);
  const uint64_t facsAddress = allocator.allocate(sizeof(Facs), kFacsAlignment);
  std::vector<uint8_t> dsdt = buildDsdt(config);
  const uint64_t dsdtAddress = allocator.allocate(dsdt.size(), kTableAlignment);
  const uint64_t fadtAddress = allocator.allocate(sizeof(Fadt), kTableAlignment);
  std::vector<uint8_t> madt = buildMadt(config);
  const uint64_t madtAddress = allocator.allocate(madt.size(), kTableAlignment);
  std::vector<uint8_t> mcfg = buildMcfg();
  const uint64_t mcfgAddress = allocator.allocate(mcfg.size(), kTableAlignment);

  require(allocator.next() <= layout::kAcpiTablesAddr + layout::kAcpiTablesMax,
          "ACPI tables need {} bytes, more than the {} reserved at {:#x}",
          allocator.next() - layout::kAcpiTablesAddr, layout::kAcpiTablesMax,
          layout::kAcpiTablesAddr);

  AcpiTables tables{rsdpAddress, allocator.next(), {}};
  tables.tables.push_back({"RSD PTR ", rsdpAddress, buildRsdp(xsdtAddress)});
  tables.tables.push_back({"XSDT", xsdtAddress, buildXsdt({fadtAddress, madtAddress, mcfgAddress})});
  tables.tables.push_back({"FACS", facsAddress, buildFacs()});
  tables.tables.push_back({"DSDT", dsdtAddress, std::move(dsdt)});
  tables.tables.push_back({"FACP", fadtAddress, buildFadt(dsdtAddress, facsAddress)});
  tables.tables.push_back({"APIC", madtAddress, std::move(madt)});
  tables.tables.push_back({"MCFG", mcfgAddress, std::move(mcfg)});
  return tables;
}

uint64_t writeAcpiTables(const GuestMemory& memory, const AcpiConfig& config) {
  if (config.pciMmio64Size != 0) {
    require(config.pciMmio64Start >= memory.endAddress(),
            "the 64-bit PCI window at {:#x} overlaps guest RAM ending at {:#x}",
            config.pciMmio64Start, memory.endAddress());
  }
  const AcpiTables tables = buildAcpiTables(config);
  // Clear the whole area so stale bytes never look like a table to a scanning OS.
  auto area = memory.slice(layout::kAcpiTablesAddr, layout::kAcpiTablesMax);
  std::fill(area.begin(), area.end(), uint8_t{0});
  for (const AcpiTable& table : tables.tables) memory.write(table.address, table.bytes);
  return tables.rsdpAddress;
}

}  // namespace clonevm::vmm
