package org.alignkd.demo

import android.content.Context
import android.net.Uri
import android.provider.DocumentsContract
import org.alignkd.core.ImageTokenCache
import java.io.File

/** The settings screen's values (SharedPreferences) and where bundles are looked for. */
class AppSettings(context: Context) {
    private val prefs = context.getSharedPreferences("alignkd", Context.MODE_PRIVATE)

    var bundlePath: String
        get() = prefs.getString("bundle_path", "") ?: ""
        set(v) = prefs.edit().putString("bundle_path", v.trim()).apply()

    var maxNewTokens: Int
        get() = prefs.getInt("max_new_tokens", 64)
        set(v) = prefs.edit().putInt("max_new_tokens", v.coerceIn(1, 4096)).apply()

    var temperature: Float
        get() = prefs.getFloat("temperature", 0f)
        set(v) = prefs.edit().putFloat("temperature", v.coerceIn(0f, 5f)).apply()

    var threads: Int
        get() = prefs.getInt("threads", 0)
        set(v) = prefs.edit().putInt("threads", v.coerceIn(0, 64)).apply()

    /** How many images' tokens the session keeps (0: none); see org.alignkd.core.ImageTokenCache. */
    var imageCacheSize: Int
        get() = prefs.getInt("image_cache_size", ImageTokenCache.DEFAULT_CAPACITY)
        set(v) = prefs.edit().putInt("image_cache_size", v.coerceIn(0, 64)).apply()

    companion object {
        /** Where `alignkd-mobile export --target android --push` puts bundles. */
        const val DEVICE_DIR = "/data/local/tmp/alignkd"

        /** A folder path, or a bare bundle name under [DEVICE_DIR] or under the app's imported bundles. */
        fun resolveBundle(context: Context, value: String): File {
            val v = value.trim()
            require(v.isNotEmpty()) { "no bundle path set: open Settings, or import a bundle from storage" }
            if (v.startsWith("/")) return File(v)
            val imported = File(importedDir(context), v)
            return if (imported.isDirectory) imported else File(DEVICE_DIR, v)
        }

        fun importedDir(context: Context): File = File(context.filesDir, "bundles")

        /**
         * Copy a bundle folder picked with the system folder picker into the app's files (ExecuTorch needs a
         * real file path); returns the copy. The copy is verified when it is loaded.
         */
        fun importTree(context: Context, tree: Uri, progress: (String) -> Unit): File {
            val resolver = context.contentResolver
            val rootId = DocumentsContract.getTreeDocumentId(tree)
            val name = rootId.substringAfterLast('/').substringAfterLast(':').ifEmpty { "bundle" }
            val dest = File(importedDir(context), name)
            val tmp = File(importedDir(context), ".$name.tmp")
            tmp.deleteRecursively()
            fun copy(docId: String, dir: File) {
                dir.mkdirs()
                val children = DocumentsContract.buildChildDocumentsUriUsingTree(tree, docId)
                resolver.query(children, arrayOf(DocumentsContract.Document.COLUMN_DOCUMENT_ID,
                    DocumentsContract.Document.COLUMN_DISPLAY_NAME, DocumentsContract.Document.COLUMN_MIME_TYPE),
                    null, null, null)?.use { c ->
                    while (c.moveToNext()) {
                        val id = c.getString(0)
                        val child = c.getString(1)
                        require(!child.contains('/') && child != ".." && child != ".") { "bad file name $child" }
                        if (c.getString(2) == DocumentsContract.Document.MIME_TYPE_DIR) {
                            copy(id, File(dir, child))
                        } else {
                            progress("copying $child")
                            resolver.openInputStream(DocumentsContract.buildDocumentUriUsingTree(tree, id)).use { inp ->
                                File(dir, child).outputStream().use { out -> inp!!.copyTo(out, 1 shl 20) }
                            }
                        }
                    }
                }
            }
            copy(rootId, tmp)
            dest.deleteRecursively()
            check(tmp.renameTo(dest)) { "cannot move the imported bundle into place" }
            return dest
        }
    }
}
