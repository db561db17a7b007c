#include "store/names.h"

#include <cstdint>
#include <cstdio>

namespace ckptkv {
namespace {

bool HasControl(std::string_view s) {
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7f) return true;
  }
  return false;
}

// The length of the well-formed UTF-8 sequence that starts `s` (1 to 4),
// or 0: a stray continuation byte, an overlong form, a surrogate
// (U+D800..U+DFFF), a code point above U+10FFFF or a truncated sequence.
size_t Utf8SequenceLength(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const unsigned char c = p[0];
  if (c < 0x80) return 1;
  size_t len = 0;
  uint32_t cp = 0;
  if (c >= 0xc2 && c <= 0xdf) {
    len = 2;
    cp = c & 0x1f;
  } else if (c >= 0xe0 && c <= 0xef) {
    len = 3;
    cp = c & 0x0f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    len = 4;
    cp = c & 0x07;
  } else {
    return 0;  // continuation byte, overlong lead (0xc0, 0xc1) or 0xf5..0xff
  }
  if (s.size() < len) return 0;
  for (size_t k = 1; k < len; ++k) {
    if ((p[k] & 0xc0) != 0x80) return 0;
    cp = (cp << 6) | (p[k] & 0x3f);
  }
  static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMin[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
  return len;
}

// The error for a name that is not UTF-8.
Status NotUtf8(const char* what, std::string_view name, size_t offset) {
  return Status::InvalidArgument(std::string(what) + " " + Quote(name) +
                                 " is not valid UTF-8 (bad byte at offset " +
                                 std::to_string(offset) + "); names must be UTF-8");
}

}  // namespace

size_t InvalidUtf8Offset(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const size_t len = Utf8SequenceLength(s.substr(i));
    if (len == 0) return i;
    i += len;
  }
  return std::string_view::npos;
}

std::string Quote(std::string_view name) {
  std::string out = "'";
  const std::string_view shown = name.substr(0, 200);
  for (size_t i = 0; i < shown.size();) {
    const unsigned char c = static_cast<unsigned char>(shown[i]);
    const size_t len = Utf8SequenceLength(shown.substr(i));
    if (c < 0x20 || c == 0x7f || len == 0) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
      ++i;
    } else {
      out.append(shown.substr(i, len));
      i += len;
    }
  }
  if (name.size() > 200) out += "...";
  return out + "'";
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

Status ValidateTagLookup(std::string_view tag) {
  if (tag.empty() || tag.size() > kMaxTagLength || tag.find('\0') != std::string_view::npos) {
    return Status::InvalidArgument("tag " + Quote(tag) +
                                   " cannot name a tag; a tag is 1-255 bytes without NUL");
  }
  return Status::OK();
}

Status ValidateTag(std::string_view tag) {
  if (tag.empty()) {
    return Status::InvalidArgument("tag is empty; a tag is 1-255 printable bytes without '/'");
  }
  if (tag.size() > kMaxTagLength) {
    return Status::InvalidArgument("tag " + Quote(tag) + " is " + std::to_string(tag.size()) +
                                   " bytes; at most 255 are allowed");
  }
  if (HasControl(tag)) {
    return Status::InvalidArgument("tag " + Quote(tag) +
                                   " contains NUL or control characters; use printable bytes");
  }
  if (size_t bad = InvalidUtf8Offset(tag); bad != std::string_view::npos) {
    return NotUtf8("tag", tag, bad);
  }
  if (tag.find('/') != std::string_view::npos || tag.find('\\') != std::string_view::npos) {
    return Status::InvalidArgument("tag " + Quote(tag) +
                                   " contains a path separator; a tag is one path component");
  }
  if (tag == "." || tag == "..") {
    return Status::InvalidArgument("tag " + Quote(tag) + " is reserved; choose another name");
  }
  if (tag == "latest") {
    return Status::InvalidArgument(
        "tag 'latest' is reserved for the pointer to the most recent checkpoint");
  }
  return Status::OK();
}

Status ValidateFile(std::string_view file) {
  if (file.empty()) {
    return Status::InvalidArgument(
        "file name is empty; expected e.g. 'mp_rank_00_model_states.pt'");
  }
  if (file.size() > kMaxFileLength) {
    return Status::InvalidArgument("file name " + Quote(file) + " is " +
                                   std::to_string(file.size()) +
                                   " bytes; at most 1024 are allowed");
  }
  if (HasControl(file)) {
    return Status::InvalidArgument("file name " + Quote(file) +
                                   " contains NUL or control characters");
  }
  if (size_t bad = InvalidUtf8Offset(file); bad != std::string_view::npos) {
    return NotUtf8("file name", file, bad);
  }
  if (file.front() == '/') {
    return Status::InvalidArgument("file name " + Quote(file) +
                                   " is absolute; expected a path relative to the tag");
  }
  size_t start = 0;
  while (start <= file.size()) {
    size_t end = file.find('/', start);
    if (end == std::string_view::npos) end = file.size();
    std::string_view part = file.substr(start, end - start);
    if (part.empty() || part == "." || part == "..") {
      return Status::InvalidArgument("file name " + Quote(file) +
                                     " has an empty, '.' or '..' component");
    }
    start = end + 1;
  }
  return Status::OK();
}

Status ValidateParam(std::string_view param) {
  if (param.empty()) return Status::InvalidArgument("parameter path is empty");
  if (param.size() > kMaxParamLength) {
    return Status::InvalidArgument("parameter path " + Quote(param) + " is longer than 8192 bytes");
  }
  if (param.find('\0') != std::string_view::npos) {
    return Status::InvalidArgument("parameter path " + Quote(param) + " contains NUL");
  }
  if (size_t bad = InvalidUtf8Offset(param); bad != std::string_view::npos) {
    return NotUtf8("parameter path", param, bad);
  }
  return Status::OK();
}

std::string TagPrefix(std::string_view tag) {
  std::string k(tag);
  k.push_back('\0');
  return k;
}

std::string FileKey(std::string_view tag, std::string_view file) {
  std::string k = TagPrefix(tag);
  k.append(file);
  return k;
}

std::string TensorPrefix(std::string_view tag, std::string_view file) {
  std::string k = FileKey(tag, file);
  k.push_back('\0');
  return k;
}

std::string TensorKey(std::string_view tag, std::string_view file, std::string_view param) {
  std::string k = TensorPrefix(tag, file);
  k.append(param);
  return k;
}

std::string PrefixEnd(std::string prefix) {
  while (!prefix.empty()) {
    unsigned char last = static_cast<unsigned char>(prefix.back());
    if (last != 0xff) {
      prefix.back() = static_cast<char>(last + 1);
      return prefix;
    }
    prefix.pop_back();
  }
  return prefix;  // empty: no upper bound
}

bool SplitKey(std::string_view key, size_t n, std::string_view* parts) {
  size_t start = 0;
  for (size_t i = 0; i + 1 < n; ++i) {
    size_t z = key.find('\0', start);
    if (z == std::string_view::npos) return false;
    parts[i] = key.substr(start, z - start);
    start = z + 1;
  }
  parts[n - 1] = key.substr(start);
  return true;
}

std::string FileName(std::string_view tag, std::string_view file) {
  std::string s;
  s.reserve(tag.size() + 1 + file.size());
  s.append(tag).append("/").append(file);
  return s;
}

std::string TensorName(std::string_view tag, std::string_view file, std::string_view param) {
  std::string s = FileName(tag, file);
  s.append(":").append(param);
  return s;
}

}  // namespace ckptkv
