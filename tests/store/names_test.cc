// Name validation: UTF-8 is required of tag, file and param names, and
// Quote shows any bytes as UTF-8.
#include <catch2/catch.hpp>
#include <string>

#include "store/names.h"

using namespace ckptkv;

TEST_CASE("names: well-formed UTF-8 is accepted", "[unit][store]") {
  const std::string names[] = {"global_step1", "caf\xc3\xa9", "\xe6\xad\xa5\xe6\x95\xb0",
                               "\xf0\x9f\x98\x80", "max\xf4\x8f\xbf\xbf"};  // U+10FFFF
  for (const auto& n : names) {
    INFO(n);
    CHECK(ValidateTag(n).ok());
    CHECK(ValidateFile("dir/" + n + ".pt").ok());
    CHECK(ValidateParam("module/" + n).ok());
    CHECK(InvalidUtf8Offset(n) == std::string_view::npos);
  }
}

// Regression: invalid UTF-8 names were accepted at the API, so JSON output
// of a store holding them threw (nlohmann::json refuses to dump them).
TEST_CASE("names: invalid UTF-8 is rejected with the offset of the bad byte", "[unit][store]") {
  struct Case {
    std::string name;
    size_t offset;
  };
  const Case cases[] = {
      {"ab\xff", 2},               // never valid in UTF-8
      {"a\x80", 1},                // stray continuation byte
      {"\xc0\xaf", 0},             // overlong '/'
      {"x\xc1\xbf", 1},            // overlong 2-byte form
      {"xy\xe0\x80\xaf", 2},       // overlong 3-byte form
      {"\xf0\x80\x80\xaf", 0},     // overlong 4-byte form
      {"s\xed\xa0\x80", 1},        // U+D800, a surrogate
      {"s\xed\xbf\xbf", 1},        // U+DFFF
      {"big\xf4\x90\x80\x80", 3},  // U+110000
      {"big\xf5\x80\x80\x80", 3},  // lead byte above 0xf4
      {"cut\xe6\xad", 3},          // truncated sequence
      {"ok\xc3\xa9then\xc3", 8},   // bad byte after good multi-byte ones
      {"mid\xe6"
       "x\xad",
       3},  // continuation missing
  };
  for (const auto& c : cases) {
    INFO(Quote(c.name));
    CHECK(InvalidUtf8Offset(c.name) == c.offset);
    const std::string at = "offset " + std::to_string(c.offset);
    Status t = ValidateTag(c.name);
    CHECK(t.IsInvalidArgument());
    CHECK(t.message().find("UTF-8") != std::string::npos);
    CHECK(t.message().find(at) != std::string::npos);
    Status f = ValidateFile("d/" + c.name);
    CHECK(f.IsInvalidArgument());
    CHECK(f.message().find("offset " + std::to_string(c.offset + 2)) != std::string::npos);
    CHECK(f.message().find("names must be UTF-8") != std::string::npos);
    Status p = ValidateParam(c.name);
    CHECK(p.IsInvalidArgument());
    CHECK(p.message().find(at) != std::string::npos);
    // The message itself is UTF-8: the bad bytes are escaped.
    CHECK(InvalidUtf8Offset(p.message()) == std::string_view::npos);
  }
}

TEST_CASE("names: Quote escapes control and non-UTF-8 bytes, keeps UTF-8", "[unit][store]") {
  CHECK(Quote("a\x01"
              "b") == "'a\\x01b'");
  CHECK(Quote("caf\xc3\xa9") == "'caf\xc3\xa9'");
  CHECK(Quote("x\xff\xc3") == "'x\\xff\\xc3'");
  CHECK(Quote("\xed\xa0\x80") == "'\\xed\\xa0\\x80'");
  std::string longname(300, 'a');
  CHECK(Quote(longname) == "'" + std::string(200, 'a') + "...'");
}
