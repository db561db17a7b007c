// Validation of user-given names and the key layout built from them.
//
// Keys: tensors CF "tag\0file\0param", files CF "tag\0file", tags CF "tag".
// Names never contain NUL, so one tag (and one file in it) is a contiguous
// prefix range.
#ifndef CKPTKV_STORE_NAMES_H_
#define CKPTKV_STORE_NAMES_H_

#include <string>
#include <string_view>
#include <vector>

#include "store/status.h"

namespace ckptkv {

inline constexpr size_t kMaxTagLength = 255;
inline constexpr size_t kMaxFileLength = 1024;
inline constexpr size_t kMaxParamLength = 8192;

// Every name is well-formed UTF-8 (no overlong forms, no surrogates, no
// code point above U+10FFFF); a name that is not is InvalidArgument naming
// the offset of its first bad byte. A store written around the API may hold
// names that are not UTF-8: readers must not fail because of them (show
// them with Quote).
//
// A tag: 1..255 bytes, printable, no '/', '\\' or NUL, not "." or "..".
Status ValidateTag(std::string_view tag);
// A file: 1..1024 bytes, relative '/'-separated path, no empty, "." or ".."
// component, no NUL or control characters.
Status ValidateFile(std::string_view file);
// A param path: 1..8192 bytes, no NUL.
Status ValidateParam(std::string_view param);
// The looser check of a tag that is looked up or deleted, not created:
// 1..255 bytes without NUL, so that a tag stored around the API (not
// UTF-8, say) can still be read and removed.
Status ValidateTagLookup(std::string_view tag);

// The offset of the first byte of `s` that does not start a well-formed
// UTF-8 sequence, or npos when all of `s` is UTF-8.
size_t InvalidUtf8Offset(std::string_view s);

std::string TagPrefix(std::string_view tag);                            // "tag\0"
std::string FileKey(std::string_view tag, std::string_view file);       // "tag\0file"
std::string TensorPrefix(std::string_view tag, std::string_view file);  // "tag\0file\0"
std::string TensorKey(std::string_view tag, std::string_view file, std::string_view param);
// The first key after every key that starts with `prefix`.
std::string PrefixEnd(std::string prefix);
// Splits "a\0b\0c" into parts; false if the count differs from `n`.
bool SplitKey(std::string_view key, size_t n, std::string_view* parts);

// How messages name a stored thing: "tag/file" and "tag/file:param".
std::string FileName(std::string_view tag, std::string_view file);
std::string TensorName(std::string_view tag, std::string_view file, std::string_view param);

// Shows a name in a message: quoted, the first 200 bytes, with control bytes
// and bytes that are not UTF-8 escaped as \\xNN (so the result is UTF-8).
std::string Quote(std::string_view name);

// "[2, 3]": a shape or index list for messages.
std::string ShapeString(const std::vector<int64_t>& shape);

}  // namespace ckptkv

#endif  // CKPTKV_STORE_NAMES_H_
