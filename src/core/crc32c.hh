#pragma once
// CRC32C (Castagnoli), as used by the spool records and the PROXY v2 CRC32C TLV.
// Uses the SSE4.2 crc32 instruction when the CPU has it, a table otherwise.
#include <cstddef>
#include <cstdint>

namespace tern {

// Continue a CRC32C over `len` bytes. Start with crc = 0; the result is final (already
// inverted), so crc32c(crc32c(0, a), b) == crc32c(0, a+b).
uint32_t crc32c(uint32_t crc, const void* data, size_t len) noexcept;

}  // namespace tern
