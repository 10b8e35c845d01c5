package org.alignkd.demo

import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.Toast
import androidx.appcompat.app.AppCompatActivity

/**
 * Settings: bundle path, max new tokens, temperature (0 = greedy, as the parity gate decodes), threads, and
 * how many images' tokens to keep (a follow-up question about a kept image skips the encoder; applies at the
 * next Load).
 */
class SettingsActivity : AppCompatActivity() {
    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_settings)
        val s = AppSettings(this)
        val path = findViewById<EditText>(R.id.bundlePathEdit)
        val maxNew = findViewById<EditText>(R.id.maxNewTokensEdit)
        val temp = findViewById<EditText>(R.id.temperatureEdit)
        val threads = findViewById<EditText>(R.id.threadsEdit)
        val cache = findViewById<EditText>(R.id.imageCacheEdit)
        path.setText(s.bundlePath)
        maxNew.setText(s.maxNewTokens.toString())
        temp.setText(s.temperature.toString())
        threads.setText(s.threads.toString())
        cache.setText(s.imageCacheSize.toString())
        findViewById<Button>(R.id.saveButton).setOnClickListener {
            val n = maxNew.text.toString().toIntOrNull()
            val t = temp.text.toString().toFloatOrNull()
            val th = threads.text.toString().toIntOrNull()
            val c = cache.text.toString().toIntOrNull()
            if (n == null || n < 1 || t == null || t < 0f || th == null || th < 0 || c == null || c < 0) {
                Toast.makeText(this, "max new tokens ≥ 1, temperature ≥ 0, threads ≥ 0, image cache ≥ 0", Toast.LENGTH_LONG).show()
                return@setOnClickListener
            }
            s.bundlePath = path.text.toString()
            s.maxNewTokens = n
            s.temperature = t
            s.threads = th
            s.imageCacheSize = c
            finish()
        }
    }
}
