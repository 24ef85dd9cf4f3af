#include "vmm-core/boot/acpi/acpi_tables.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <map>

#include "common/error.h"
#include "vmm-core/boot/boot_test_util.h"

namespace clonevm::vmm {
namespace {

using layout::kGiB;
using layout::kMiB;
using ::testing::HasSubstr;
using ::testing::Not;
using testing::CommandResult;
using testing::findInPath;
using testing::readTextFile;
using testing::runCommand;
using testing::TempDir;
using testing::writeFile;

constexpr uint64_t kWindow64Start = 64 * kGiB;

AcpiConfig configFor(uint32_t vcpus) {
  return {.vcpuCount = vcpus, .pciMmio64Start = kWindow64Start,
          .pciMmio64Size = layout::kPciMmio64Size};
}

template <typename T>
T field(const std::vector<uint8_t>& bytes, size_t offset) {
  T value;
  EXPECT_LE(offset + sizeof(T), bytes.size());
  std::memcpy(&value, bytes.data() + offset, sizeof(T));
  return value;
}

std::map<std::string, AcpiTable> bySignature(const AcpiTables& tables) {
  std::map<std::string, AcpiTable> out;
  for (const AcpiTable& table : tables.tables) out[table.signature] = table;
  return out;
}

TEST(AcpiTablesTest, EveryTableHasItsLengthAndAValidChecksum) {
  const AcpiTables tables = buildAcpiTables(configFor(4));
  ASSERT_EQ(tables.tables.size(), 7u);
  for (const AcpiTable& table : tables.tables) {
    SCOPED_TRACE(table.signature);
    EXPECT_GE(table.address, layout::kAcpiTablesAddr);
    EXPECT_LE(table.address + table.bytes.size(), layout::kAcpiTablesAddr + layout::kAcpiTablesMax);
    EXPECT_LE(table.address + table.bytes.size(), tables.endAddress);
    EXPECT_EQ(std::string(table.bytes.begin(), table.bytes.begin() + 4),
              table.signature.substr(0, 4));
    if (table.signature == "RSD PTR ") {
      EXPECT_EQ(acpiChecksum(table.bytes, 0, 20), 0) << "ACPI 1.0 checksum";
      EXPECT_EQ(acpiChecksum(table.bytes), 0) << "extended checksum";
      EXPECT_EQ(field<uint32_t>(table.bytes, 20), 36u);
      continue;
    }
    EXPECT_EQ(field<uint32_t>(table.bytes, 4), table.bytes.size());
    if (table.signature == "FACS") continue;  // the FACS carries no checksum
    EXPECT_EQ(acpiChecksum(table.bytes), 0);
    EXPECT_EQ(std::string(table.bytes.begin() + 10, table.bytes.begin() + 16), "CLONE ");
    EXPECT_EQ(std::string(table.bytes.begin() + 16, table.bytes.begin() + 24), "CLONEVM ");
  }
}

TEST(AcpiTablesTest, PointersLinkTheTablesTogether) {
  const AcpiTables tables = buildAcpiTables(configFor(2));
  auto all = bySignature(tables);
  const AcpiTable& rsdp = all.at("RSD PTR ");
  EXPECT_EQ(rsdp.address, layout::kAcpiTablesAddr);
  EXPECT_EQ(tables.rsdpAddress, layout::kAcpiTablesAddr);
  EXPECT_EQ(rsdp.address % 16, 0u) << "the legacy scan looks at 16-byte boundaries";
  EXPECT_EQ(rsdp.bytes[15], 2) << "revision 2: XSDT present";
  EXPECT_EQ(std::string(rsdp.bytes.begin() + 9, rsdp.bytes.begin() + 15), "CLONE ");
  EXPECT_EQ(field<uint64_t>(rsdp.bytes, 24), all.at("XSDT").address);

  const AcpiTable& xsdt = all.at("XSDT");
  ASSERT_EQ(xsdt.bytes.size(), 36u + 3 * 8);
  EXPECT_EQ(field<uint64_t>(xsdt.bytes, 36), all.at("FACP").address);
  EXPECT_EQ(field<uint64_t>(xsdt.bytes, 44), all.at("APIC").address);
  EXPECT_EQ(field<uint64_t>(xsdt.bytes, 52), all.at("MCFG").address);

  const AcpiTable& fadt = all.at("FACP");
  EXPECT_EQ(field<uint32_t>(fadt.bytes, 36), all.at("FACS").address);
  EXPECT_EQ(field<uint32_t>(fadt.bytes, 40), all.at("DSDT").address);
  EXPECT_EQ(field<uint64_t>(fadt.bytes, 132), 0u) << "X_FIRMWARE_CTRL unused below 4 GiB";
  EXPECT_EQ(field<uint64_t>(fadt.bytes, 140), all.at("DSDT").address);
  EXPECT_EQ(all.at("FACS").address % 64, 0u) << "the FACS must be 64-byte aligned";
}

TEST(AcpiTablesTest, FadtDescribesTheFixedHardware) {
  const auto fadt = bySignature(buildAcpiTables(configFor(1))).at("FACP").bytes;
  ASSERT_EQ(fadt.size(), 276u);
  EXPECT_EQ(fadt[8], 6) << "revision";
  EXPECT_EQ(field<uint16_t>(fadt, 46), layout::kSciIrq);
  EXPECT_EQ(field<uint32_t>(fadt, 48), 0u) << "SMI_CMD: always in ACPI mode";
  EXPECT_EQ(field<uint32_t>(fadt, 56), layout::kPm1aEventPort);
  EXPECT_EQ(field<uint32_t>(fadt, 64), layout::kPm1aControlPort);
  EXPECT_EQ(field<uint32_t>(fadt, 76), layout::kPmTimerPort);
  EXPECT_EQ(fadt[88], 4) << "PM1_EVT_LEN";
  EXPECT_EQ(fadt[89], 2) << "PM1_CNT_LEN";
  EXPECT_EQ(fadt[91], 4) << "PM_TMR_LEN";

  const uint16_t bootArch = field<uint16_t>(fadt, 109);
  EXPECT_TRUE(bootArch & (1 << 1)) << "8042 present";
  EXPECT_TRUE(bootArch & (1 << 2)) << "no VGA";
  EXPECT_FALSE(bootArch & (1 << 3)) << "MSI must not be flagged unsupported";
  EXPECT_FALSE(bootArch & (1 << 5)) << "CMOS RTC present";

  const uint32_t flags = field<uint32_t>(fadt, 112);
  EXPECT_TRUE(flags & (1 << 8)) << "TMR_VAL_EXT";
  EXPECT_TRUE(flags & (1 << 10)) << "RESET_REG_SUP";
  EXPECT_FALSE(flags & (1 << 20)) << "not hardware-reduced";

  EXPECT_EQ(fadt[116], 1) << "reset register in System I/O";
  EXPECT_EQ(fadt[117], 8);
  EXPECT_EQ(field<uint64_t>(fadt, 120), layout::kResetPort);
  EXPECT_EQ(fadt[128], layout::kResetValue);

  // X_ blocks: same addresses, widths = 8 * legacy lengths.
  struct Block {
    size_t offset;
    uint16_t port;
    uint8_t bits;
  };
  for (const Block& block : {Block{148, layout::kPm1aEventPort, 32},
                             Block{172, layout::kPm1aControlPort, 16},
                             Block{208, layout::kPmTimerPort, 32}}) {
    EXPECT_EQ(fadt[block.offset], 1) << block.offset;
    EXPECT_EQ(fadt[block.offset + 1], block.bits) << block.offset;
    EXPECT_EQ(field<uint64_t>(fadt, block.offset + 4), block.port) << block.offset;
  }
}

TEST(AcpiTablesTest, MadtHasOneLocalApicPerVcpu) {
  for (uint32_t vcpus : {1u, 2u, 7u, 64u, kAcpiMaxVcpus}) {
    SCOPED_TRACE(vcpus);
    const auto madt = bySignature(buildAcpiTables(configFor(vcpus))).at("APIC").bytes;
    EXPECT_EQ(madt.size(), 44u + 8 * vcpus + 12 + 2 * 10 + 6);
    EXPECT_EQ(field<uint32_t>(madt, 36), layout::kLapicAddr);
    EXPECT_EQ(field<uint32_t>(madt, 40), 1u) << "PCAT_COMPAT: KVM's PIC is there";

    std::map<uint8_t, int> countByType;
    std::vector<uint8_t> apicIds;
    std::vector<std::pair<uint8_t, uint32_t>> overrides;
    for (size_t offset = 44; offset < madt.size(); offset += madt[offset + 1]) {
      ASSERT_GE(madt[offset + 1], 2);
      const uint8_t type = madt[offset];
      ++countByType[type];
      if (type == 0) {
        apicIds.push_back(madt[offset + 3]);
        EXPECT_EQ(field<uint32_t>(madt, offset + 4), 1u) << "enabled";
      } else if (type == 1) {
        EXPECT_EQ(field<uint32_t>(madt, offset + 4), layout::kIoapicAddr);
        EXPECT_EQ(field<uint32_t>(madt, offset + 8), 0u) << "GSI base";
      } else if (type == 2) {
        overrides.emplace_back(madt[offset + 3], field<uint32_t>(madt, offset + 4));
        if (madt[offset + 3] == layout::kSciIrq) {
          EXPECT_EQ(field<uint16_t>(madt, offset + 8), 0x000d) << "level, active high";
        }
      } else if (type == 4) {
        EXPECT_EQ(madt[offset + 2], 0xff) << "all processors";
        EXPECT_EQ(madt[offset + 5], 1) << "LINT1";
      }
    }
    EXPECT_EQ(countByType[0], static_cast<int>(vcpus));
    EXPECT_EQ(countByType[1], 1);
    EXPECT_EQ(countByType[2], 2);
    EXPECT_EQ(countByType[4], 1);
    for (uint32_t i = 0; i < vcpus; ++i) EXPECT_EQ(apicIds[i], i);
    EXPECT_THAT(overrides, ::testing::UnorderedElementsAre(std::pair<uint8_t, uint32_t>{0, 2},
                                                           std::pair<uint8_t, uint32_t>{9, 9}));
  }
}

TEST(AcpiTablesTest, McfgCoversAllBusesOfSegmentZero) {
  const auto mcfg = bySignature(buildAcpiTables(configFor(1))).at("MCFG").bytes;
  ASSERT_EQ(mcfg.size(), 60u);
  EXPECT_EQ(field<uint64_t>(mcfg, 44), layout::kEcamStart);
  EXPECT_EQ(field<uint16_t>(mcfg, 52), 0);
  EXPECT_EQ(mcfg[54], 0);
  EXPECT_EQ(mcfg[55], 255);
}

TEST(AcpiTablesTest, RejectsBadConfigs) {
  EXPECT_THROW(buildAcpiTables(configFor(0)), Error);
  EXPECT_THROW(buildAcpiTables(configFor(kAcpiMaxVcpus + 1)), Error);
  EXPECT_THROW(buildAcpiTables({.vcpuCount = 1, .pciMmio64Start = 3 * kGiB}), Error);
  auto memory = GuestMemory::create(4 * kGiB + 512 * kMiB);
  EXPECT_THROW(writeAcpiTables(memory, {.vcpuCount = 1, .pciMmio64Start = 5 * kGiB}), Error);
  // Without a 64-bit window the start does not matter.
  EXPECT_NO_THROW(buildAcpiTables({.vcpuCount = 1, .pciMmio64Start = 0, .pciMmio64Size = 0}));
}

TEST(AcpiTablesTest, WritesTablesWhereTheLegacyScanFindsTheRsdp) {
  auto memory = GuestMemory::create(64 * kMiB);
  auto area = memory.slice(layout::kAcpiTablesAddr, layout::kAcpiTablesMax);
  std::fill(area.begin(), area.end(), uint8_t{0x5a});  // stale junk must be cleared
  const uint64_t rsdp = writeAcpiTables(memory, configFor(2));
  EXPECT_EQ(rsdp, layout::kAcpiTablesAddr);

  // Scan 0xE0000..0xFFFFF like Linux's acpi_find_root_pointer does.
  std::optional<uint64_t> found;
  for (uint64_t address = layout::kBiosStart; address < 1 * kMiB; address += 16) {
    std::vector<uint8_t> candidate(36);
    memory.read(address, candidate);
    if (std::memcmp(candidate.data(), "RSD PTR ", 8) == 0 && acpiChecksum(candidate, 0, 20) == 0) {
      found = address;
      break;
    }
  }
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(*found, rsdp);

  for (const AcpiTable& table : buildAcpiTables(configFor(2)).tables) {
    std::vector<uint8_t> inMemory(table.bytes.size());
    memory.read(table.address, inMemory);
    EXPECT_EQ(inMemory, table.bytes) << table.signature;
  }
  const auto end = buildAcpiTables(configFor(2)).endAddress;
  EXPECT_EQ(memory.readObject<uint8_t>(end), 0) << "junk after the tables was cleared";
}

// ---- The real proof: ACPICA's own tools accept the tables ----

class AcpicaToolsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // acpica-tools is a build dependency (scripts/install-deps.sh): missing is a failure.
    for (const char* tool : {"iasl", "acpiexec"}) {
      ASSERT_TRUE(findInPath(tool).has_value())
          << tool << " not found in PATH; install acpica-tools (apt-get install acpica-tools)";
    }
    for (const AcpiTable& table : tables_.tables) {
      if (table.signature == "RSD PTR ") continue;
      std::string name = table.signature;
      for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      writeFile(dir_ / (name + ".dat"), table.bytes);
      files_[table.signature] = name;
    }
    std::filesystem::create_directory(dir_ / "recompiled");
  }

  std::string run(const std::string& command) {
    CommandResult result = runCommand("cd '" + dir_.path().string() + "' && " + command);
    EXPECT_EQ(result.exitCode, 0) << command << "\n" << result.output;
    return result.output;
  }

  // iasl -d: binary table to ASL/data-table source.
  std::string disassemble(const std::string& signature) {
    const std::string name = files_.at(signature);
    const std::string output = run("iasl -d " + name + ".dat");
    EXPECT_TRUE(std::filesystem::exists(dir_ / (name + ".dsl"))) << output;
    const std::string source = readTextFile(dir_ / (name + ".dsl"));
    EXPECT_THAT(source, Not(HasSubstr("Incorrect checksum")));
    EXPECT_THAT(source, Not(HasSubstr("Invalid")));
    for (const std::string& text : {output, source}) {
      EXPECT_THAT(text, Not(HasSubstr("Error")));
      EXPECT_THAT(text, Not(HasSubstr("Warning")));
    }
    return source;
  }

  // Compiles the disassembly back (without optimizations, so it stays byte-comparable) and
  // returns the binary iasl produced.
  std::vector<uint8_t> recompile(const std::string& signature) {
    const std::string name = files_.at(signature);
    std::filesystem::copy_file(dir_ / (name + ".dsl"), dir_ / "recompiled" / (name + ".dsl"));
    const std::string output = run("cd recompiled && iasl -oa " + name + ".dsl");
    EXPECT_THAT(output, HasSubstr("0 Errors, 0 Warnings, 0 Remarks"));
    std::ifstream in(dir_ / "recompiled" / (name + ".aml"), std::ios::binary);
    return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
  }

  AcpiTables tables_ = buildAcpiTables(configFor(4));
  TempDir dir_;
  std::map<std::string, std::string> files_;
};

TEST_F(AcpicaToolsTest, DsdtDisassemblesWithEveryDevice) {
  const std::string dsl = disassemble("DSDT");
  for (const char* expected :
       {"Name (\\_S5, Package (0x04)", "0x05, ", "Device (PCI0)", "EisaId (\"PNP0A08\")",
        "EisaId (\"PNP0A03\")", "Name (_SEG, Zero)", "Name (_BBN, Zero)", "Device (MBRD)",
        "EisaId (\"PNP0C02\")", "Device (COM1)", "EisaId (\"PNP0501\")", "Method (\\_PIC, 1",
        "WordBusNumber (ResourceProducer", "0x00FF,             // Range Maximum",
        "0x0CF7,             // Range Maximum", "0x0D00,             // Range Minimum",
        "0xFFFF,             // Range Maximum", "0xC0000000,         // Range Minimum",
        "0xDFFFFFFF,         // Range Maximum", "0x0000001000000000, // Range Minimum",
        "0x0000001FFFFFFFFF, // Range Maximum", "0x0CF8,             // Range Minimum",
        "0xE0000000,         // Address Base", "0x10000000,         // Address Length",
        "0x03F8,             // Range Minimum", "{4}"}) {
    EXPECT_THAT(dsl, HasSubstr(expected));
  }
}

TEST_F(AcpicaToolsTest, DsdtRecompilesToTheSameAml) {
  disassemble("DSDT");
  const std::vector<uint8_t> ours = bySignature(tables_).at("DSDT").bytes;
  const std::vector<uint8_t> theirs = recompile("DSDT");
  ASSERT_EQ(theirs.size(), ours.size());
  // The header differs only in compiler id/version and so checksum; the AML must be identical.
  EXPECT_EQ(std::vector<uint8_t>(theirs.begin() + 36, theirs.end()),
            std::vector<uint8_t>(ours.begin() + 36, ours.end()));
}

TEST_F(AcpicaToolsTest, DataTablesDisassembleAndRecompileIdentically) {
  for (const char* signature : {"FACP", "APIC", "MCFG", "XSDT", "FACS"}) {
    SCOPED_TRACE(signature);
    const std::string dsl = disassemble(signature);
    const std::vector<uint8_t> ours = bySignature(tables_).at(signature).bytes;
    const std::vector<uint8_t> theirs = recompile(signature);
    ASSERT_EQ(theirs.size(), ours.size());
    EXPECT_EQ(std::vector<uint8_t>(theirs.begin(), theirs.begin() + 9),
              std::vector<uint8_t>(ours.begin(), ours.begin() + 9));
    EXPECT_EQ(std::vector<uint8_t>(theirs.begin() + 36, theirs.end()),
              std::vector<uint8_t>(ours.begin() + 36, ours.end()));
  }
}

TEST_F(AcpicaToolsTest, FadtDecodesAsIntended) {
  const std::string dsl = disassemble("FACP");
  for (const char* expected :
       {"Revision : 06", "SCI Interrupt : 0009", "PM1A Event Block Address : 00000600",
        "PM1A Control Block Address : 00000604", "PM Timer Block Address : 00000608",
        "8042 Present on ports 60/64 (V2) : 1", "VGA Not Present (V4) : 1",
        "MSI Not Supported (V4) : 0", "32-bit PM Timer (V1) : 1",
        "Reset Register Supported (V2) : 1", "Hardware Reduced (V5) : 0",
        "Address : 0000000000000CF9", "Value to cause reset : 06"}) {
    EXPECT_THAT(dsl, HasSubstr(expected));
  }
}

TEST_F(AcpicaToolsTest, AcpiexecLoadsTheTablesAndEvaluatesTheDsdt) {
  // ACPICA's table manager parses our FADT (and warns on any 32/64-bit field mismatch), loads
  // the DSDT into a namespace and runs its objects.
  const std::string output =
      run("timeout 60 acpiexec -b 'evaluate \\_S5; evaluate \\_SB.PCI0._CRS; "
          "evaluate \\_SB.COM1._HID; evaluate \\_PIC 1; evaluate \\PICM' "
          "dsdt.dat facp.dat facs.dat apic.dat mcfg.dat");
  EXPECT_THAT(output, HasSubstr("FACP 0x"));
  EXPECT_THAT(output, HasSubstr("(v06 CLONE  CLONEVM"));
  EXPECT_THAT(output, HasSubstr("1 ACPI AML tables successfully acquired and loaded"));
  EXPECT_THAT(output, HasSubstr("[Package] Contains 4 Elements:\n"
                                "    [Integer] = 0000000000000005"));
  EXPECT_THAT(output, HasSubstr("[Integer] = 000000000105D041"));  // COM1 _HID
  EXPECT_THAT(output, HasSubstr("[Integer] = 0000000000000001"));  // PICM after _PIC(1)
  EXPECT_THAT(output, Not(HasSubstr("Warning")));
  EXPECT_THAT(output, Not(HasSubstr("Error")));
  EXPECT_THAT(output, Not(HasSubstr("Could not")));
}

}  // namespace
}  // namespace clonevm::vmm
