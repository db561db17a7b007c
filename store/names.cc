#include "store/names.h"

#include <cstdio>

namespace ckptkv {
namespace {

bool HasControl(std::string_view s) {
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7f) return true;
  }
  return false;
}

}  // namespace

std::string Quote(std::string_view name) {
  std::string out = "'";
  for (unsigned char c : name.substr(0, 200)) {
    if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out.push_back(static_cast<char>(c));
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

}  // namespace ckptkv
