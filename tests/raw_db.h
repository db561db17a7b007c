// The raw RocksDB database of a closed store, for tests that damage it.
#ifndef CKPTKV_TESTS_RAW_DB_H_
#define CKPTKV_TESTS_RAW_DB_H_

#include <rocksdb/db.h>

#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace ckptkv::testing {

class RawDb {
 public:
  explicit RawDb(const std::string& dir) {
    std::vector<std::string> names;
    Check(rocksdb::DB::ListColumnFamilies(rocksdb::DBOptions(), dir, &names));
    rocksdb::ColumnFamilyOptions cfo;
    cfo.enable_blob_files = true;
    cfo.min_blob_size = 4096;
    std::vector<rocksdb::ColumnFamilyDescriptor> descs;
    for (const auto& n : names) descs.emplace_back(n, cfo);
    rocksdb::DB* raw = nullptr;
    Check(rocksdb::DB::Open(rocksdb::DBOptions(), dir, descs, &handles_, &raw));
    db_.reset(raw);
    for (size_t i = 0; i < names.size(); ++i) cf_[names[i]] = handles_[i];
  }
  ~RawDb() {
    for (auto* h : handles_) db_->DestroyColumnFamilyHandle(h);
  }
  rocksdb::DB* db() { return db_.get(); }
  rocksdb::ColumnFamilyHandle* cf(const std::string& name) { return cf_.at(name); }
  std::string Get(const std::string& cf_name, const std::string& key) {
    std::string v;
    Check(db_->Get(rocksdb::ReadOptions(), cf(cf_name), key, &v));
    return v;
  }
  void Put(const std::string& cf_name, const std::string& key, const std::string& value) {
    Check(db_->Put(rocksdb::WriteOptions(), cf(cf_name), key, value));
  }

 private:
  static void Check(const rocksdb::Status& s) {
    if (!s.ok()) throw std::runtime_error("raw database: " + s.ToString());
  }
  std::unique_ptr<rocksdb::DB> db_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
  std::map<std::string, rocksdb::ColumnFamilyHandle*> cf_;
};

}  // namespace ckptkv::testing

#endif  // CKPTKV_TESTS_RAW_DB_H_
