// Strict parsing of numeric command-line values, shared by ckptkv and
// kv-browser: a value is accepted only when all of it is a number of the
// expected kind inside the option's range. Overflow, NaN, infinities, signs
// where a count is expected, exponents, hex, trailing garbage and unknown
// units are refused with a message that names the option and what is valid.
// Header-only; the CLI11 validators need CLI11, the parsers do not.
#ifndef CKPTKV_TOOLS_CLI_ARGS_H_
#define CKPTKV_TOOLS_CLI_ARGS_H_

#include <cctype>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>

#include <CLI/CLI.hpp>

namespace ckptkv::tools {

// A decimal integer: an optional '-' then digits, nothing else. nullopt on
// anything else, or when it does not fit in int64_t.
inline std::optional<int64_t> ParseDecimal(std::string_view s) {
  const bool neg = !s.empty() && s[0] == '-';
  if (neg) s.remove_prefix(1);
  if (s.empty() || s.size() > 19) return std::nullopt;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return std::nullopt;
    v = v * 10 + static_cast<uint64_t>(c - '0');  // 19 digits fit in uint64_t
  }
  const uint64_t limit = neg ? uint64_t{1} << 63 : (uint64_t{1} << 63) - 1;
  if (v > limit) return std::nullopt;
  return neg ? static_cast<int64_t>(0 - v) : static_cast<int64_t>(v);
}

// An unsigned decimal integer (digits only, up to 2^64 - 1).
inline std::optional<uint64_t> ParseUnsignedDecimal(std::string_view s) {
  if (s.empty() || s.size() > 20) return std::nullopt;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return std::nullopt;
    const uint64_t d = static_cast<uint64_t>(c - '0');
    if (v > (std::numeric_limits<uint64_t>::max() - d) / 10) return std::nullopt;
    v = v * 10 + d;
  }
  return v;
}

// "" when `s` is a decimal integer in [min, max]; otherwise what is wrong,
// e.g. "'-1' is not valid: give a whole number from 1 to 10000".
inline std::string CheckIntArg(std::string_view s, int64_t min, int64_t max) {
  auto v = ParseDecimal(s);
  if (v && *v >= min && *v <= max) return "";
  return "'" + std::string(s) + "' is not valid: give a whole number from " + std::to_string(min) +
         " to " + std::to_string(max);
}

inline std::string CheckUintArg(std::string_view s, uint64_t min, uint64_t max) {
  auto v = ParseUnsignedDecimal(s);
  if (v && *v >= min && *v <= max) return "";
  return "'" + std::string(s) + "' is not valid: give a whole number from " + std::to_string(min) +
         " to " + std::to_string(max);
}

// A byte size: a decimal number (digits, optionally '.' and digits) and an
// optional unit B, K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB (any case; all
// binary, 1K = 1024). The result is rounded down to whole bytes and must be
// in [min, max]. On failure `error` says why.
inline std::optional<uint64_t> ParseByteSize(std::string_view s, uint64_t min, uint64_t max,
                                             std::string* error) {
  auto fail = [&]() -> std::optional<uint64_t> {
    *error = "'" + std::string(s) + "' is not a size: give a number of bytes from " +
             std::to_string(min) + " to " + std::to_string(max) +
             ", optionally with a unit B, KiB, MiB, GiB or TiB (e.g. 500MiB, 1.5GiB)";
    return std::nullopt;
  };
  size_t i = 0;
  uint64_t whole = 0;
  size_t digits = 0;
  for (; i < s.size() && s[i] >= '0' && s[i] <= '9'; ++i, ++digits) {
    const uint64_t d = static_cast<uint64_t>(s[i] - '0');
    if (whole > (std::numeric_limits<uint64_t>::max() - d) / 10) return fail();
    whole = whole * 10 + d;
  }
  // Up to 18 fraction digits, as a numerator over 10^n.
  uint64_t frac = 0, frac_den = 1;
  if (i < s.size() && s[i] == '.') {
    ++i;
    size_t fd = 0;
    for (; i < s.size() && s[i] >= '0' && s[i] <= '9'; ++i, ++fd) {
      if (fd >= 18) return fail();
      frac = frac * 10 + static_cast<uint64_t>(s[i] - '0');
      frac_den *= 10;
    }
    if (fd == 0) return fail();
  }
  if (digits == 0) return fail();
  std::string unit(s.substr(i));
  for (auto& ch : unit) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  int shift = -1;
  if (unit.empty() || unit == "B") shift = 0;
  if (unit == "K" || unit == "KB" || unit == "KIB") shift = 10;
  if (unit == "M" || unit == "MB" || unit == "MIB") shift = 20;
  if (unit == "G" || unit == "GB" || unit == "GIB") shift = 30;
  if (unit == "T" || unit == "TB" || unit == "TIB") shift = 40;
  if (shift < 0) return fail();
  const uint64_t mult = uint64_t{1} << shift;
  if (whole > std::numeric_limits<uint64_t>::max() / mult) return fail();
  uint64_t bytes = whole * mult;
  // frac / frac_den * mult, exact in 128 bits (frac < 10^18, mult <= 2^40).
  const unsigned __int128 part =
      static_cast<unsigned __int128>(frac) * mult / static_cast<unsigned __int128>(frac_den);
  if (bytes > std::numeric_limits<uint64_t>::max() - static_cast<uint64_t>(part)) return fail();
  bytes += static_cast<uint64_t>(part);
  if (bytes < min || bytes > max) return fail();
  return bytes;
}

// CLI11 validators over the same rules (the option name is prefixed by
// CLI11: "--limit: '-1' is not valid: give a whole number from 1 to ...").
inline CLI::Validator IntArg(int64_t min, int64_t max) {
  return CLI::Validator([min, max](std::string& s) { return CheckIntArg(s, min, max); },
                        "INT in [" + std::to_string(min) + " - " + std::to_string(max) + "]");
}
inline CLI::Validator UintArg(uint64_t min, uint64_t max) {
  return CLI::Validator([min, max](std::string& s) { return CheckUintArg(s, min, max); },
                        "UINT in [" + std::to_string(min) + " - " + std::to_string(max) + "]");
}

// A block codec by name: raw, zstd or grouped-zstd (store/block_codec.h).
inline CLI::Validator CodecArg() {
  return CLI::Validator(
      [](std::string& s) {
        return s == "raw" || s == "zstd" || s == "grouped-zstd"
                   ? std::string()
                   : "'" + s + "' is not a codec: give raw, zstd or grouped-zstd";
      },
      "raw|zstd|grouped-zstd");
}

}  // namespace ckptkv::tools

#endif  // CKPTKV_TOOLS_CLI_ARGS_H_
