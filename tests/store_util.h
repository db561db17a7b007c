// Store helpers shared by the store tests and the fuzz targets.
#ifndef CKPTKV_TESTS_STORE_UTIL_H_
#define CKPTKV_TESTS_STORE_UTIL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "store/store.h"

namespace ckptkv::testing {

// Saves `bytes` as a 1-D uint8 tensor `param` of `tag`/`file`.
inline Result<WriteStats> PutBytes(Store& s, const std::string& tag, const std::string& file,
                                   const std::string& param, const std::vector<uint8_t>& bytes) {
  TensorMeta meta;
  meta.dtype = fb::DType::UInt8;
  meta.shape = {static_cast<int64_t>(bytes.size())};
  ByteSource src;
  src.length = bytes.size();
  src.data = bytes.data();
  return s.PutTensor(tag, file, param, meta, src);
}

}  // namespace ckptkv::testing

#endif  // CKPTKV_TESTS_STORE_UTIL_H_
