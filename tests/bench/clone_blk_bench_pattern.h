#pragma once
// The data pattern clone-blk-bench writes, shared with its test so the test can check an image
// file independently of the driver's own read-back.
//
// Every 512-byte sector holds 64 little-endian words that depend only on the sector number and
// a seed: word 0 is the sector number xor a magic (the "stamp"), word 1 the seed, words 2..63 a
// hash of (sector, word, seed). A full write sets all 64 words; a benchmark write sets only the
// stamp words of each sector; so any sector the driver wrote carries a valid stamp, and a disk
// filled with full writes keeps full-pattern content under benchmark writes of the same seed
// except in the sectors those writes touched.

#include <cstdint>

namespace clonevm::bench {

inline constexpr uint64_t kSectorBytes = 512;
inline constexpr unsigned kWordsPerSector = kSectorBytes / 8;
inline constexpr uint64_t kStampMagic = 0x6b6c622d656e6f6cull;  // "lone-blk"

inline uint64_t patternWord(uint64_t sector, unsigned word, uint64_t seed) {
  if (word == 0) return sector ^ kStampMagic;
  if (word == 1) return seed;
  uint64_t x = sector * 0x9e3779b97f4a7c15ull + word * 0xbf58476d1ce4e5b9ull + seed;
  x ^= x >> 31;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 29);
}

inline void writeStamp(uint64_t* words, uint64_t sector, uint64_t seed) {
  words[0] = patternWord(sector, 0, seed);
  words[1] = patternWord(sector, 1, seed);
}

inline void writeFullSector(uint64_t* words, uint64_t sector, uint64_t seed) {
  for (unsigned i = 0; i < kWordsPerSector; ++i) words[i] = patternWord(sector, i, seed);
}

inline bool stampMatches(const uint64_t* words, uint64_t sector, uint64_t seed) {
  return words[0] == patternWord(sector, 0, seed) && words[1] == patternWord(sector, 1, seed);
}

inline bool fullSectorMatches(const uint64_t* words, uint64_t sector, uint64_t seed) {
  for (unsigned i = 0; i < kWordsPerSector; ++i) {
    if (words[i] != patternWord(sector, i, seed)) return false;
  }
  return true;
}

}  // namespace clonevm::bench
